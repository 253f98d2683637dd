"""Which decode attention an executor's model calls, placed on its mesh.

``"xla"`` is the model's own :func:`optkit.model.dense_decode_attention` (any device).
``"pallas"`` is the fused kernel of :mod:`optkit.kernels.decode_attention`, run per shard
with ``shard_map`` (rows and heads split as the rule table splits the cache; each device
attends its own heads).  ``"auto"`` takes the kernel on GPUs where it applies, else XLA.
Off GPUs an explicit ``"pallas"`` runs the kernel through Pallas' interpreter: the same
numbers, slowly (tests use it).
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, PartitionSpec

from optkit.config import OPTConfig

ATTENTION_CHOICES = ("auto", "xla", "pallas")


def check_attention(choice: str) -> str:
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention={choice!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
    return choice


def _kernel():
    """The kernel module, or None and why (Pallas is experimental: a JAX may lack it)."""
    try:
        from optkit.kernels import decode_attention
    except ImportError as e:
        return None, f"Pallas is unavailable in this JAX ({e})"
    return decode_attention, None


def resolve_attention(choice: str, cfg: OPTConfig, mesh: Mesh, kv_spec: PartitionSpec) -> str:
    """``"xla"`` or ``"pallas"`` for this model on this mesh (``kv_spec``: the cache's
    partitioning); an explicit ``"pallas"`` that cannot run is an error."""
    check_attention(choice)
    if choice == "xla":
        return "xla"
    kernel, why = _kernel()
    if why is None and not kernel.supported(cfg.head_dim):
        why = f"head size {cfg.head_dim} is not a power of two >= 16"
    if why is None and (kv_spec[1] is not None or kv_spec[3] is not None):
        why = "the cache's sequence or head_dim axis is split over devices"
    if why is None and choice == "auto" and any(d.platform != "gpu" for d in mesh.devices.flat):
        why = "not on GPUs"
    if why is None:
        return "pallas"
    if choice == "pallas":
        raise ValueError(f"attention='pallas' cannot run here: {why}")
    return "xla"


def decode_attention_fn(choice: str, cfg: OPTConfig, mesh: Mesh, kv_spec: PartitionSpec,
                        interpret: bool | None = None):
    """The ``attention`` argument for ``model.decode_layers``: None (the model's own) or the
    fused kernel, wrapped in ``shard_map`` over ``mesh`` when the mesh has several devices.
    ``interpret`` (default: off GPUs) runs the kernel through Pallas' interpreter."""
    if resolve_attention(choice, cfg, mesh, kv_spec) == "xla":
        return None
    kernel, _ = _kernel()
    if interpret is None:
        interpret = any(d.platform != "gpu" for d in mesh.devices.flat)
    rows, heads = kv_spec[0], kv_spec[2]

    def attend(qkv, k, v, mask, index, live, scale):
        del live  # the kernel stops at each row's own index
        call = functools.partial(kernel.decode_attention, scale=scale, interpret=interpret)
        bias = kernel.mask_bias(mask)
        if mesh.devices.size == 1:
            return call(qkv, k, v, bias, index)
        heads_spec = PartitionSpec(rows, heads, None)
        kv = PartitionSpec(rows, None, heads, None)
        fn = jax.shard_map(call, mesh=mesh, check_vma=False,
                           in_specs=(PartitionSpec(rows, None, heads, None), kv, kv,
                                     PartitionSpec(rows, None), PartitionSpec(rows)),
                           out_specs=(heads_spec, kv, kv))
        return fn(qkv, k, v, bias, index)

    return attend
