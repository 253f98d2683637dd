"""The API-key file format and the constant-time key check."""

import hmac

import pytest

from optkit.serve import keys as keys_module
from optkit.serve import read_api_keys
from optkit.serve.keys import KeyChecker


def write(tmp_path, text):
    f = tmp_path / "keys"
    f.write_text(text)
    return f


def test_key_is_the_whole_first_field_and_comments_are_whole_lines(tmp_path):
    f = write(tmp_path, "# team keys\n  # indented comment\nsk-hash#secretpart 2\n"
                        "\n\tplain\n#notakey 5\n")
    assert read_api_keys(f) == {"sk-hash#secretpart": 2.0, "plain": 1.0}


@pytest.mark.parametrize("text, message", [
    ("", "no API keys"),
    ("# only a comment\n", "no API keys"),
    ("sk-secret-one 1 2\n", r":1: expected 'KEY \[WEIGHT\]', found 3 fields"),
    ("ok\nsk-secret-one # trailing comment\n", r":2: expected 'KEY \[WEIGHT\]'"),
    ("sk-secret-one sk-secret-two\n", ":1: the weight is not a number"),
    ("sk-secret-one 0\n", "positive finite"),
    ("sk-secret-one inf\n", "positive finite"),
    ("sk-secret-one nan\n", "positive finite"),
    ("sk-secret-one\nx\nsk-secret-one 2\n", ":3: the key repeats the key of line 1"),
])
def test_bad_lines_name_the_line_never_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as e:
        read_api_keys(write(tmp_path, text))
    assert "secret" not in str(e.value)


def test_undecodable_file_shows_no_bytes(tmp_path):
    f = tmp_path / "keys"
    f.write_bytes(b"sk-\xffsecret\n")
    with pytest.raises(ValueError, match="not UTF-8") as e:
        read_api_keys(f)
    assert "secret" not in str(e.value) and "ff" not in str(e.value)


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls, real = [], hmac.compare_digest

    def compare(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", compare)
    checker = KeyChecker({"sk-a": 1, "sk-hash#secret": 2, "sk-c": 1})
    for presented, expected in [(b"sk-a", "sk-a"), (b"sk-hash#secret", "sk-hash#secret"),
                                (b"sk-hash", None), (b"wrong-and-much-longer", None)]:
        calls.clear()
        assert checker.match(presented) == expected
        assert calls == [(32, 32)] * 3  # no early exit; fixed-length digests


@pytest.mark.parametrize("header, key", [
    (b"Bearer sk-a", "sk-a"), (b"bearer  sk-a ", "sk-a"), (b"Basic sk-a", None),
    (b"sk-a", None), (b"", None), (None, None), (b"Bearer ", None)])
def test_bearer_header(header, key):
    assert KeyChecker({"sk-a": 1}).check_header(header) == key
