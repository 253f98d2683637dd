"""The model-loading options ``optkit generate`` and ``optkit serve`` share."""

from __future__ import annotations

import argparse

from optkit.options import DTYPE_ALIASES, DTYPES, PALLAS_KERNELS, Kernels, dtype_name


def _dtype(text: str) -> str:
    """``--dtype``: a canonical dtype name (``optkit.options``)."""
    try:
        return dtype_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kernels(text: str) -> str:
    """``--kernels``, checked by ``optkit.options.Kernels`` (``pallas`` is resolved against
    ``--quantize`` when the model loads)."""
    try:
        Kernels.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip().lower()


def add_loading_options(group) -> None:
    """``--dtype``, ``--quantize``, ``--kernels``, ``--cluster`` and ``--checksums`` on a
    parser or group."""
    group.add_argument("--dtype", type=_dtype, default="auto", metavar="DTYPE",
                       help=f"{', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}); auto: "
                            "float16 on GPUs, float32 on CPU")
    group.add_argument("--quantize", choices=["int8"],
                       help="int8 weight-only matmul kernels, quantized while loading")
    group.add_argument("--kernels", type=_kernels, default="auto", metavar="CHOICE",
                       help="Pallas kernels in the decode step of jax/ and alpa/ models: "
                            "auto (on GPUs, those that apply: fused attention, int8 products), "
                            "xla (none), pallas (all that apply), or "
                            f"names joined by commas from {', '.join(PALLAS_KERNELS)} "
                            "(matvec: int8 models)")
    group.add_argument("--cluster", metavar="ADDRESS",
                       help="run an alpa/ model on a Ray cluster: auto (the cluster this "
                            "machine joined with `ray start`), HEAD:6379 or ray://HEAD:10001")
    group.add_argument("--checksums", action="store_true",
                       help="verify every weight file's sha256 against the folder's "
                            "optkit-manifest.json before loading (reads all the weights "
                            "once more; jax/ and alpa/ folders)")


def load_model(args):
    """``get_model`` with the parsed ``--model``, ``--path``, ``--dummy`` and loading options."""
    from optkit import get_model
    from optkit.weights.hub import MissingWeights

    if args.checksums and (args.dummy or args.model.startswith("facebook/")):
        raise ValueError("--checksums verifies an optkit weight folder: use jax/ or alpa/ "
                         "with --path (not --dummy)")
    try:
        return get_model(args.model, path=args.path, dummy=args.dummy, dtype=args.dtype,
                         cluster=args.cluster, quantize=args.quantize, kernels=args.kernels,
                         checksums=args.checksums)
    except MissingWeights as e:
        raise ValueError(e.explain(path="--path DIR", dummy="--dummy")) from None
