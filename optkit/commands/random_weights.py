"""``optkit random-weights``: write a random model of any preset as a weight folder."""

from __future__ import annotations

import argparse

import numpy as np

from optkit.config import PRESETS, OPTConfig


def register(sub) -> None:
    p = sub.add_parser("random-weights", help="write random weights of any OPT size",
                       description="Write a model with random weights in Alpa's numpy folder "
                       "layout (what get_model(..., dummy=True) uses in memory).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dst", help="output folder, e.g. weights/opt-125m-np")
    p.add_argument("--model", default="opt-125m",
                   help=f"preset ({', '.join(PRESETS)}) or an HF config.json path")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=run)


def run(args) -> int:
    from optkit.weights.random import write_random_folder

    cfg = (OPTConfig.from_json(args.model) if args.model.endswith(".json")
           else OPTConfig.from_name(args.model))
    out = write_random_folder(args.dst, cfg, seed=args.seed, dtype=np.dtype(args.dtype),
                              overwrite=args.overwrite)
    print(f"wrote {out} ({cfg.num_params() / 1e6:.1f}M parameters)")
    return 0
