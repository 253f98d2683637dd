"""The one stop matcher and the one text stream under generate's host loop."""

from optkit import get_tokenizer
from optkit.generation.stop import StopMatcher
from optkit.generation.stream import HFCodec, StopStrings, TextStream


def test_stop_matcher_finds_the_earliest_and_what_to_hold_back():
    m = StopMatcher(["end", "", "nd.", "end"])
    assert m.stops == ("end", "nd.") and bool(m) and not StopMatcher([""])
    assert m.find("the end.") == 4
    assert m.find("we nd. end") == 3            # the earliest start wins
    assert m.find("nothing here") is None
    # only occurrences that end after ``start`` are looked for
    assert m.find("end and more", start=2) == 0
    assert m.find("end and more", start=3) is None
    assert m.held("we e") == 1 and m.held("we en") == 2 and m.held("we n") == 1
    assert m.held("we nd") == 2 and m.held("dont") == 0


def test_stop_strings_per_row_on_the_tokenizer():
    tok = get_tokenizer()
    rows = [tok("one two three four", add_special_tokens=False)["input_ids"],
            tok("alpha beta", add_special_tokens=False)["input_ids"]]
    stops = StopStrings(tok, [" thr"], rows=2)
    hits = [[stops.push(r, t) for t in toks] for r, toks in enumerate(rows)]
    assert hits[0].index(True) == 2 and not any(hits[1])
    assert stops.streams[0].text == "one two"


def test_text_stream_holds_a_possible_stop_then_releases_it():
    codec = HFCodec(get_tokenizer())
    s = TextStream(codec, ["\nUser:"])
    out = []
    for t in codec.encode("Fine thanks.\nUs", add_special_tokens=False):
        s.add(t)
        out.append(s.release())
    assert "".join(out) == "Fine thanks."   # "\nUs" may begin the stop string
    for t in codec.encode("ually yes", add_special_tokens=False):
        s.add(t)
    assert s.release() == "\nUsually yes" and not s.stopped
    s.finish()
    assert s.release(final=True) == "" and s.text == "Fine thanks.\nUsually yes"


def test_hf_codec_decodes_as_the_tokenizer_does():
    """The codec calls a fast tokenizer's Rust decoder itself: the same text as the
    tokenizer's ``decode`` (special tokens skipped, spaces not cleaned up), split UTF-8
    characters and special tokens included."""
    import numpy as np

    tok = get_tokenizer()
    codec = HFCodec(tok)
    assert codec._backend is not None
    rng = np.random.default_rng(0)
    cases = [codec.encode("naïve café ☕ — ok", add_special_tokens=True)]
    cases += [rng.integers(0, len(tok), rng.integers(0, 12)).tolist() for _ in range(300)]
    cases += [ids[:k] for ids in cases[:1] for k in range(len(ids))]  # cut mid-character
    for ids in cases:
        assert codec.decode(np.array(ids, np.int64)) == tok.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_text_stream_extend_gives_the_text_of_adding_one_by_one():
    """Several tokens at once (the server's path for sequences without stop strings or
    log-probs): after each batch the text is what adding them one at a time gives."""
    import numpy as np

    tok = get_tokenizer()
    codec = HFCodec(tok)
    rng = np.random.default_rng(1)
    texts = ["naïve café ☕ — ok, 日本語のテキスト and more", "plain words only here",
             "emoji 🎉🎉 split 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    for text in texts * 20:
        ids = codec.encode(text, add_special_tokens=False)
        for _ in range(3):  # special tokens here and there
            ids.insert(int(rng.integers(0, len(ids) + 1)), tok.eos_token_id)
        one, many = TextStream(codec), TextStream(codec)
        a = 0
        while a < len(ids):
            b = a + int(rng.integers(1, 9))
            for t in ids[a:b]:
                one.add(t)
            many.extend(ids[a:b])
            assert many.text == one.text and many.release() == one.release()
            a = b
        assert many.text == text
    # a stop string inside a batch still cuts the text there
    s = TextStream(codec, ["café"])
    s.extend(codec.encode("naïve café ☕", add_special_tokens=False))
    assert s.stopped and s.text == "naïve "
