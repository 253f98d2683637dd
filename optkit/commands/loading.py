"""The model-loading options ``optkit generate`` and ``optkit serve`` share."""

from __future__ import annotations


def add_loading_options(group) -> None:
    """``--dtype``, ``--quantize``, ``--attention`` and ``--cluster`` on a parser or group."""
    group.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    group.add_argument("--quantize", choices=["int8"],
                       help="int8 weight-only matmul kernels, quantized while loading")
    group.add_argument("--attention", choices=["auto", "xla", "pallas"], default="auto",
                       help="decode attention of jax/ and alpa/ models: auto (a fused Pallas "
                            "kernel on GPUs, XLA elsewhere), xla or pallas (default: auto)")
    group.add_argument("--cluster", metavar="ADDRESS",
                       help="run an alpa/ model on a Ray cluster: auto (the cluster this "
                            "machine joined with `ray start`), HEAD:6379 or ray://HEAD:10001")


def load_model(args):
    """``get_model`` with the parsed ``--model``, ``--path``, ``--dummy`` and loading options."""
    from optkit import get_model

    return get_model(args.model, path=args.path, dummy=args.dummy, dtype=args.dtype,
                     cluster=args.cluster, quantize=args.quantize, attention=args.attention)
