"""``optkit generate``: complete prompts with any backend."""

from __future__ import annotations

import argparse
import time


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts",
                       description="Generate continuations of prompts with an OPT model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="jax/opt-125m",
                   help="facebook/opt-*, jax/opt-* or alpa/opt-*")
    p.add_argument("--path", help="folder holding {name}-np/ (or the folder / an HF dir)")
    p.add_argument("--dummy", action="store_true", help="random weights instead of --path")
    p.add_argument("--tokenizer", help="tokenizer folder (default: optkit's embedded one)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="run an alpa/ model on a Ray cluster: auto (the cluster this "
                        "machine joined with `ray start`), HEAD:6379 or ray://HEAD:10001")
    p.set_defaults(func=run)


def run(args) -> int:
    from optkit import get_model, get_tokenizer

    prompts = args.prompt or ["Paris is the capital city of"]
    tok = get_tokenizer(args.tokenizer)
    tok.padding_side = "left"
    t0 = time.perf_counter()
    model = get_model(args.model, path=args.path, dummy=args.dummy, dtype=args.dtype,
                      cluster=args.cluster)
    t1 = time.perf_counter()
    enc = tok(prompts, return_tensors="np", padding=True)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=args.max_new_tokens, do_sample=False)
    t2 = time.perf_counter()
    for prompt, seq in zip(prompts, out, strict=True):
        text = tok.decode(seq[enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{prompt!r} -> {text!r}")
    print(f"# {model!r}: load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s")
    return 0
