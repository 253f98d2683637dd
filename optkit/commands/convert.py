"""``optkit convert {hf,...} SRC DST``: write Alpa-layout numpy weight folders."""

from __future__ import annotations

import argparse

from optkit.weights.convert import DTYPES, convert_hf


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to Alpa's numpy weight folder",
                       description="Convert OPT checkpoints into Alpa's numpy folder layout "
                       "(one np.save file per tensor, loadable with get_model(path=...)).")
    kinds = p.add_subparsers(dest="source", metavar="SOURCE")
    hf = kinds.add_parser("hf", help="an HF transformers OPT directory",
                          description="Convert an HF OPT checkpoint directory (config.json plus "
                          "model.safetensors or pytorch_model.bin, single or sharded) into a "
                          "weight folder.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hf.add_argument("src", help="HF model directory")
    hf.add_argument("dst", help="output folder, e.g. weights/opt-125m-np")
    add_common(hf)
    hf.set_defaults(func=run_hf)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def add_common(p) -> None:
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="dtype of the written files (auto keeps fp16/fp32, widens bf16 to fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_hf(args) -> int:
    out = convert_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                     progress=not args.no_progress)
    print(f"wrote {out}")
    return 0
