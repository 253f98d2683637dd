"""Greedy decoding of a random-weight int8 model on one GPU with each int8 product path:
the tensor-core kernel (optkit.kernels.int8_mma) on every kernel its blocks tile, whatever
its size (by default only OPT-175B-sized ones take it), the CUDA-core kernel
(optkit.kernels.int8_matvec) and XLA's products.  Reports whether the tokens agree and the
largest difference of any step's logits.

    python benchmarks/int8_decode_check.py --sizes 1.3b,6.7b --out int8_check.jsonl
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from optkit import get_model
from optkit.kernels import int8_mma


def decode(size: str, path: str, prompt: int, new_tokens: int, batch: int = 1):
    """(tokens, per-step logits) of ``alpa/opt-{size}`` (random int8 weights) along ``path``:
    mma, words or xla."""
    plan, least = int8_mma.plan, (int8_mma.MIN_CHANNELS, int8_mma.MIN_INPUTS)
    int8_mma.plan = plan if path == "mma" else (lambda n, k, rows=1: None)
    int8_mma.MIN_CHANNELS = int8_mma.MIN_INPUTS = 0
    try:
        model = get_model(f"alpa/opt-{size}", dummy=True, quantize="int8", progress=False,
                          kernels="xla" if path == "xla" else "auto")
        ids = np.random.default_rng(0).integers(4, 50000, (batch, prompt)).astype(np.int32)
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens,
                             return_dict_in_generate=True, output_scores=True)
        return np.asarray(out.sequences), np.stack([np.asarray(s, np.float32)
                                                    for s in out.scores])
    finally:
        int8_mma.plan = plan
        int8_mma.MIN_CHANNELS, int8_mma.MIN_INPUTS = least


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1.3b")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="rows (the tensor-core kernel takes "
                   "up to int8_mma.MAX_ROWS at once)")
    p.add_argument("--max-rows", type=int, help="rows the tensor-core kernel may take "
                   "(default: int8_mma.MAX_ROWS)")
    p.add_argument("--out", default="int8_decode_check.jsonl")
    args = p.parse_args()
    if args.max_rows:
        int8_mma.MAX_ROWS = args.max_rows
    with open(args.out, "a") as f:
        for size in args.sizes.split(","):
            runs = {path: decode(size, path, args.prompt, args.new_tokens, args.batch)
                    for path in ("mma", "words", "xla")}
            for other in ("words", "xla"):
                diff = np.abs(runs["mma"][1] - runs[other][1])
                same = runs["mma"][0] == runs[other][0]
                row = {"size": size, "vs": other, "batch": args.batch,
                       "new_tokens": args.new_tokens, "max_rows": int8_mma.MAX_ROWS,
                       "same_tokens": bool(same.all()),
                       # step 0 is the prefill's (no int8 hook: equal by construction);
                       # step 1 the first decode step, the same inputs on every path
                       "first_decode_step_max_abs_logit_diff": float(diff[1].max()),
                       "rows_with_other_tokens": int((~same.all(-1)).sum()),
                       "max_abs_logit_diff": float(diff.max()),
                       "max_abs_logit": float(np.abs(runs[other][1]).max()),
                       "card": jax.devices()[0].device_kind, "jax": jax.__version__}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
