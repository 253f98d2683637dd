from transformers import AutoTokenizer

from optkit.weights.tokenizer import ASSET_DIR, SPECIALS, get_tokenizer, train_tokenizer


def test_embedded_tokenizer_has_opt_files_and_ids():
    names = {p.name for p in ASSET_DIR.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    tok = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    assert len(tok) == 50265  # OPT's real tokenizer size; the model vocab is 50272
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (1, 2, 2)
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == 2  # OPT prepends </s>
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"


def test_round_trips_arbitrary_text():
    tok = get_tokenizer()
    text = "naïve café — 東京 🚀 def f(x): return x**2\n\ttabs"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_train_small_tokenizer(tmp_path):
    corpus = ["the cat sat on the mat"] * 50 + ["a dog ran in the park"] * 50
    out = train_tokenizer(tmp_path / "tok", vocab_size=300, corpus=corpus)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == SPECIALS
    assert tok.decode(tok("the cat")["input_ids"], skip_special_tokens=True) == "the cat"
