"""optkit's two int8 GEMV kernels, timed against each other and the read ceiling (one GPU).

``words``: ``optkit.kernels.int8_matvec`` (CUDA cores); ``dot``: ``optkit.kernels.int8_mma``
(tensor cores) at its plan (no settings) and at a sweep of blocks, stages, warps and K
splits; ``read``: a sum of the same bytes.  With ``--rows`` > 1, tiles of rows against
XLA's dot over the widened kernel.  The rows behind the tensor-core kernel's plan are in
``results/gpu/`` (``benchmarks/README.md`` names them).

    python benchmarks/gemv_variants.py --out variants.jsonl                  # on a GPU
    python benchmarks/gemv_variants.py --models 6.7b --out variants.jsonl
    python benchmarks/gemv_variants.py --models 6.7b,13b --rows 64 --out variants.jsonl
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp

from benchmarks.gemv_pallas import SHAPES, read_words, time_configs, words_gemv, xla_gemv
from optkit.kernels.int8_mma import int8_mma


def mma_gemv(x, q, scale, **cfg):
    """optkit.kernels.int8_mma on a vector or rows (its blocks from ``cfg``, else its plan)."""
    xs = x.reshape(-1, x.shape[-1]).astype(jnp.float16)
    y = int8_mma(xs, q, scale, **cfg).astype(x.dtype)
    return y.reshape(x.shape[:-1] + y.shape[1:])


IMPLS = {"read": read_words, "words": words_gemv, "dot": mma_gemv, "xla": xla_gemv}


def configs(n: int, k: int, rows: int = 1) -> list[tuple[str, dict]]:
    if rows > 1:  # XLA's dot over the widened kernel (the decode step's other way) and
        # tiles of rows against wider blocks of channels, more warps, shorter K blocks
        wide = [(bn, bk, w, st) for bn, bk, w, st in (
            (64, 256, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3),
            (128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 8, 4),
            (256, 64, 8, 3), (256, 128, 8, 2))
            if n % bn == 0 and k % bk == 0]
        return [("read", {}), ("xla", {})] + [
            ("dot", {"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st,
                     "split": 1}) for bn, bk, w, st in wide]
    out = [("read", {}), ("words", {"block_n": 8, "block_k": 2048, "num_warps": 4}),
           ("dot", {})]
    dots = [{"block_n": bn, "block_k": bk, "num_stages": st}
            for bn in (32, 64) for bk in (256, 512) for st in (2, 3, 4)]
    dots += [{"block_n": 16, "block_k": 512}, {"block_n": 64, "block_k": 256, "num_warps": 8},
             {"block_n": 64, "block_k": 256, "split": 2},
             {"block_n": 64, "block_k": 512, "split": 2},
             {"block_n": 128, "block_k": 256, "num_warps": 8}]
    for cfg in dots:
        if n % cfg["block_n"] == 0 and k % (cfg["block_k"] * cfg.get("split", 1)) == 0:
            out.append(("dot", {"split": 1, **cfg}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="175b/tp2", help=f"of {sorted(SHAPES)}")
    p.add_argument("--kernels", default="", help="only these kernels (qkv,out,fc1,fc2)")
    p.add_argument("--iters", type=int, default=200, help="products per timed call")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rotate-bytes", type=float, default=400e6,
                   help="rotate over this many bytes of kernels (far more than L2)")
    p.add_argument("--out", default="gemv_variants.jsonl")
    p.add_argument("--rows", type=int, default=1,
                   help="rows of x (more than 1: XLA's dot and a sweep of wider blocks)")
    args = p.parse_args()
    rows = []
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            if not args.kernels or name in args.kernels.split(","):
                rows += time_configs(model, name, n, k, configs(n, k, args.rows), IMPLS,
                                     args)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
