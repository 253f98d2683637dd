"""``optkit convert {hf,metaseq} SRC DST``: write Alpa-layout numpy weight folders (and
``optkit convert make-synthetic-metaseq DST``: a random model in a Metaseq layout)."""

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
    register_metaseq(kinds)
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


def register_metaseq(kinds) -> None:
    from optkit.weights.metaseq.synthetic import SYNTHETIC_LAYOUTS

    ms = kinds.add_parser(
        "metaseq", help="Meta's original (metaseq) OPT checkpoints",
        description="Convert a Metaseq OPT checkpoint into a weight folder, one tensor at a "
        "time (memory ~ the largest tensor, independent of model size). Recognised layouts: "
        "OPT-175B's FSDP x model-parallel shards (checkpoint_last-model_part-{p}-shard{r}.pt), "
        "the reshard-model_part-{p}.pt parts of the v1_20220502 (flat) and v1_20230405 "
        "(unflattened) releases, 350m's reshard.pt, and a consolidated single file. "
        "Interrupted conversions resume when re-run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ms.add_argument("src", help="folder holding the *.pt files (or a single .pt file)")
    ms.add_argument("dst", nargs="?",
                    help="output folder, e.g. weights/opt-175b-np; needed unless --dry-run")
    ms.add_argument("--model", default=None,
                    help="preset (opt-175b, opt-66b, ...) or an HF config.json; inferred "
                    "from the tensor shapes and the checkpoint's cfg if not given")
    ms.add_argument("--md5", metavar="CSV", default=None,
                    help="verify the files against Meta's md5 sums file (shard,md5sum) "
                    "first; no check if not given")
    ms.add_argument("--clamp", action="store_true",
                    help="clip values with |x| > --extreme-threshold (and NaN/inf) instead of "
                    "only warning (OPT-175B part 5 shard 51 holds corrupt values, metaseq #122)")
    ms.add_argument("--extreme-threshold", type=float, default=1e4,
                    help="|x| above which a weight value is reported as corrupt")
    ms.add_argument("--dry-run", action="store_true",
                    help="only detect the layout and config and check every file's structure "
                    "and shapes; write nothing")
    add_common(ms)
    ms.set_defaults(func=run_metaseq)

    syn = kinds.add_parser(
        "make-synthetic-metaseq", help="write a random model as a Metaseq checkpoint",
        description="Write random OPT weights (optkit's deterministic random_state_dict) in one "
        "of Meta's checkpoint layouts, byte-for-byte in Meta's structure, e.g. to try "
        "'optkit convert metaseq' without downloading 350 GB.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    syn.add_argument("dst", help="output folder for the .pt files and md5sum_shards.csv")
    syn.add_argument("--model", default="opt-tiny",
                     help="preset (opt-tiny, opt-125m, ...) or an HF config.json path")
    syn.add_argument("--layout", default="fsdp", choices=SYNTHETIC_LAYOUTS,
                     help="fsdp: P x W flat shards as OPT-175B; v1_20220502 / v1_20230405: "
                     "reshard-model_part-{p}.pt of those releases; consolidated: one file")
    syn.add_argument("--parts", type=int, default=2, help="model-parallel parts P")
    syn.add_argument("--shards", type=int, default=1, help="FSDP shards W per part (fsdp)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    syn.add_argument("--split-qkv", action="store_true",
                     help="consolidated: store q/k/v separately (as Alpa's consolidation)")
    syn.add_argument("--no-md5", action="store_true", help="skip md5sum_shards.csv")
    syn.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    syn.add_argument("--no-progress", action="store_true", help="hide progress bars")
    syn.set_defaults(func=run_synthetic)


def run_metaseq(args) -> int:
    from pathlib import Path

    from optkit.weights.metaseq import convert_metaseq, open_metaseq, verify_md5
    from optkit.weights.metaseq.consolidate import plan
    from optkit.weights.metaseq.reader import discover

    if not args.dry_run:
        if args.dst is None:
            raise ValueError("DST is required (or pass --dry-run)")
        if Path(args.dst).exists() and not args.overwrite:
            raise FileExistsError(f"{args.dst} already exists (pass --overwrite to replace it)")
    if args.md5:
        verify_md5(args.md5, [f for part in discover(args.src) for f in part],
                   progress=not args.no_progress)
        print(f"md5 sums match {args.md5}")
    ckpt = open_metaseq(args.src, args.model)
    print(ckpt.describe())
    plan(ckpt)
    if args.dry_run:
        print("dry run: every file parsed and every tensor's shape checked; nothing written")
        return 0
    out = convert_metaseq(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                          clamp_extremes=args.clamp, threshold=args.extreme_threshold,
                          progress=not args.no_progress, checkpoint=ckpt)
    print(f"wrote {out}")
    return 0


def run_synthetic(args) -> int:
    from optkit.weights.metaseq import write_synthetic_metaseq
    from optkit.weights.metaseq.reader import resolve_model

    cfg = resolve_model(args.model)
    parts = 1 if args.layout == "consolidated" else args.parts
    shards = args.shards if args.layout == "fsdp" else 1
    out = write_synthetic_metaseq(args.dst, cfg, layout=args.layout, parts=parts, shards=shards,
                                  seed=args.seed, dtype=args.dtype, split_qkv=args.split_qkv,
                                  md5=not args.no_md5, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    print(f"wrote {out}: {cfg.name} as {args.layout}, {parts} part(s) x {shards} shard(s)")
    return 0
