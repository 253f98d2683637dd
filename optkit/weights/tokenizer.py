"""A small GPT-2-style byte-level BPE tokenizer, trained locally, saved as OPT's files.

Real OPT checkpoints ship ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and
``tokenizer_config.json`` (a ``GPT2Tokenizer`` that prepends ``</s>``).  No tokenizer can be
downloaded here, so optkit trains one with the same special ids (``<s>``=0, ``<pad>``=1,
``</s>``=2, ``<unk>``=3) and writes the same four files; ``AutoTokenizer.from_pretrained``
then runs its real loading code.  The package ships one under ``optkit/assets/tokenizer``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
DEFAULT_VOCAB = 50265  # the size of OPT's real tokenizer

TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "add_bos_token": True,
    "add_prefix_space": False,
    "bos_token": "</s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "</s>",
    "errors": "replace",
    "model_max_length": 1000000000000000019884624838656,
}
SPECIAL_TOKENS_MAP = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
                      "unk_token": "</s>"}


def stdlib_corpus() -> Iterator[str]:
    """The Python standard library's own source files (code, comments and docstrings):
    several MB of text that every machine with Python has."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if "site-packages" in rel or "test" in rel or "tests" in rel:
            continue
        try:
            yield f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def train_tokenizer(out_dir: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB,
                    corpus: Iterable[str] | None = None) -> Path:
    """Train a byte-level BPE on ``corpus`` and write OPT's four tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus if corpus is not None else stdlib_corpus(), trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return out


def get_tokenizer(path: str | os.PathLike | None = None):
    """``AutoTokenizer`` from ``path`` (an HF/OPT tokenizer folder), else optkit's own."""
    from transformers import AutoTokenizer

    path = Path(path) if path is not None else ASSET_DIR
    if not (path / "vocab.json").is_file() and not (path / "tokenizer.json").is_file():
        if path == ASSET_DIR:
            train_tokenizer(ASSET_DIR)
        else:
            raise FileNotFoundError(f"no tokenizer files (vocab.json/merges.txt) in {path}")
    return AutoTokenizer.from_pretrained(str(path))
