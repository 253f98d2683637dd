"""The model-loading options ``optkit generate`` and ``optkit serve`` share."""

from __future__ import annotations

import argparse

# optkit.parallel.kernels' PALLAS_KERNELS (not imported: --help stays free of JAX)
_KERNEL_NAMES = ("attention", "matvec", "norm")


def _kernels(text: str) -> str:
    if text in ("auto", "xla", "pallas") or all(n in _KERNEL_NAMES for n in text.split(",")):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: auto, xla, pallas, or names joined by commas from {', '.join(_KERNEL_NAMES)}")


def add_loading_options(group) -> None:
    """``--dtype``, ``--quantize``, ``--kernels`` and ``--cluster`` on a parser or group."""
    group.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    group.add_argument("--quantize", choices=["int8"],
                       help="int8 weight-only matmul kernels, quantized while loading")
    group.add_argument("--kernels", type=_kernels, default="auto", metavar="CHOICE",
                       help="Pallas kernels in the decode step of jax/ and alpa/ models: "
                            "auto (on GPUs, those that apply: fused attention, int8 products), "
                            "xla (none), pallas (all), or "
                            "names joined by commas from attention, norm, matvec")
    group.add_argument("--cluster", metavar="ADDRESS",
                       help="run an alpa/ model on a Ray cluster: auto (the cluster this "
                            "machine joined with `ray start`), HEAD:6379 or ray://HEAD:10001")


def load_model(args):
    """``get_model`` with the parsed ``--model``, ``--path``, ``--dummy`` and loading options."""
    from optkit import get_model

    return get_model(args.model, path=args.path, dummy=args.dummy, dtype=args.dtype,
                     cluster=args.cluster, quantize=args.quantize, kernels=args.kernels)
