"""Incremental detokenization, stop strings and token offsets."""

from optkit import get_tokenizer
from optkit.serve.text import CharCodec, HFCodec, TextStream, TokenEntry, prompt_entries


def feed(stream, text):
    codec, out = stream.codec, []
    for t in codec.encode(text):
        stream.add(t, TokenEntry(codec.token_str(t), -1.0, None, 0))
        out.append(stream.release())
    return out


def test_stop_string_is_held_back_then_cut():
    s = TextStream(CharCodec(), stop=["cd", "xyz"])
    assert feed(s, "abc") == ["a", "b", ""]      # "c" may begin "cd"
    assert not s.stopped
    feed(s, "d")
    assert s.stopped and s.text == "ab"
    assert s.release(final=True) == ""
    # entries of tokens that start at or after the cut are dropped with the stop string
    assert [e.token for e in s.pop_entries(final=True)] == ["a", "b"]


def test_held_suffix_released_when_it_stops_matching():
    s = TextStream(CharCodec(), stop=["xyz"])
    assert feed(s, "axy") == ["a", "", ""]
    assert feed(s, "q") == ["xyq"]
    assert s.release(final=True) == ""


def test_earliest_of_several_stops_wins_and_offsets():
    s = TextStream(CharCodec(), stop=["fg", "de"], start=10)
    feed(s, "abcdefg")
    assert s.stopped and s.text == "abc"
    entries = s.pop_entries(final=True)
    assert [(e.token, e.offset) for e in entries] == [("a", 10), ("b", 11), ("c", 12)]


def test_split_utf8_characters_never_show_as_replacement():
    codec = HFCodec(get_tokenizer())
    text = "héllo wörld 😀 end, ünïcödé"
    ids = codec.encode(text)[1:]  # without </s>
    assert len(ids) > len(text.split())  # the emoji spans several byte tokens
    s = TextStream(codec)
    pieces = []
    for t in ids:
        s.add(t, TokenEntry(codec.token_str(t), 0.0, None, 0))
        pieces.append(s.release())
    s.finish()
    pieces.append(s.release(final=True))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    entries = s.pop_entries(final=True)
    assert len(entries) == len(ids)
    # the emoji's byte tokens share the emoji's offset
    emoji_at = text.index("😀")
    assert sum(e.offset == emoji_at for e in entries) >= 2
    for e in entries:
        if e.token.strip() and "\ufffd" not in e.token:
            assert text[e.offset:].startswith(e.token)


def test_prompt_entries_skip_special_tokens_in_text():
    codec = HFCodec(get_tokenizer())
    ids = codec.encode("Paris is")
    assert ids[0] == 2
    text, entries = prompt_entries(codec, ids, [-1.0] * (len(ids) - 1),
                                   [{"x": -1.0}] * (len(ids) - 1))
    assert text == "Paris is"
    assert entries[0].token == "</s>" and entries[0].logprob is None and entries[0].top is None
    assert [e.offset for e in entries] == [0, 0] + [text.index(e.token) for e in entries[2:]]
    assert all(e.logprob == -1.0 for e in entries[1:])
