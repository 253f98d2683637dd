"""The model-loading options ``optkit generate`` and ``optkit serve`` share."""

from __future__ import annotations

import argparse

from optkit.parallel.kernels import PALLAS_KERNELS as _KERNEL_NAMES
from optkit.parallel.kernels import check_kernels


def _kernels(text: str) -> str:
    """``--kernels``, checked by ``optkit.parallel.kernels``."""
    try:
        return check_kernels(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_loading_options(group) -> None:
    """``--dtype``, ``--quantize``, ``--kernels`` and ``--cluster`` on a parser or group."""
    group.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    group.add_argument("--quantize", choices=["int8"],
                       help="int8 weight-only matmul kernels, quantized while loading")
    group.add_argument("--kernels", type=_kernels, default="auto", metavar="CHOICE",
                       help="Pallas kernels in the decode step of jax/ and alpa/ models: "
                            "auto (on GPUs, those that apply: fused attention, int8 products), "
                            "xla (none), pallas (all), or "
                            f"names joined by commas from {', '.join(_KERNEL_NAMES)}")
    group.add_argument("--cluster", metavar="ADDRESS",
                       help="run an alpa/ model on a Ray cluster: auto (the cluster this "
                            "machine joined with `ray start`), HEAD:6379 or ray://HEAD:10001")


def load_model(args):
    """``get_model`` with the parsed ``--model``, ``--path``, ``--dummy`` and loading options."""
    from optkit import get_model
    from optkit.weights.hub import MissingWeights

    try:
        return get_model(args.model, path=args.path, dummy=args.dummy, dtype=args.dtype,
                         cluster=args.cluster, quantize=args.quantize, kernels=args.kernels)
    except MissingWeights as e:
        raise ValueError(e.explain(path="--path DIR", dummy="--dummy")) from None
