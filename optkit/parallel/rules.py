"""Parallel strategies as tables: logical axis name -> mesh axis.

Every weight and cache dimension carries a logical name (``ParamSpec.axes`` in
``optkit.weights.layout``; :data:`CACHE_AXES` here).  A strategy only says which mesh axis
each name is split over; the model code never changes.  :func:`logical_sharding` turns a
table, a mesh and an array's logical axes into its sharding: every sharding optkit uses comes
from it.

=========== ======================================================================
mesh axis   meaning
=========== ======================================================================
``data``    data parallel: batch rows split, weights replicated
``tensor``  Megatron tensor parallel: QKV and FC1 split by columns (heads, mlp),
            the output projection and FC2 by rows, the tied embedding / LM head by
            vocabulary; XLA inserts one all-reduce after each row-parallel matmul
``stage``   pipeline parallel: consecutive layers on their own sub-mesh of devices
=========== ======================================================================
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

#: Logical axis name -> mesh axis name (or tuple of names, or None for replicated).
Rules = Mapping[str, str | tuple[str, ...] | None]

#: Logical names of every dimension the rules can map.
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "head_dim", "mlp", "norm", "layers",
                "cache_seq")
MESH_AXES = ("stage", "data", "tensor")

#: Logical axes of the KV cache's arrays (``optkit.model.init_cache``).
CACHE_AXES = {
    "kv": ("batch", "cache_seq", "heads", "head_dim"),
    "mask": ("batch", "cache_seq"),
    "index": ("batch",),
    # one layer's paged K/V pool (A, blocks, block_size, D): every replica holds all blocks
    "pool": ("heads", None, None, "head_dim"),
}

DATA_PARALLEL = {"batch": "data"}
TENSOR_PARALLEL = {"heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
PIPELINE_PARALLEL = {"layers": "stage"}
#: dp x tp on one mesh (a :class:`~optkit.parallel.executor.MeshExecutor`'s rules).
TENSOR_RULES = {**DATA_PARALLEL, **TENSOR_PARALLEL}
#: dp x tp x pp: the default rules of a :class:`~optkit.parallel.plan.Plan`.
DEFAULT_RULES = {**TENSOR_RULES, **PIPELINE_PARALLEL}


def axis_names(target) -> tuple[str, ...]:
    """Mesh axis names of one rule target or PartitionSpec entry (None, a name, or names)."""
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def logical_sharding(mesh: Mesh | AbstractMesh, rules: Rules, axes: tuple[str | None, ...],
                     shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of an array of ``shape`` whose dims have logical names ``axes`` (None:
    unnamed) on ``mesh`` under ``rules``.  A dim the mesh axes do not divide, or whose mesh
    axes an earlier dim already uses, stays replicated."""
    out, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        target = rules.get(name) if name else None
        names = tuple(n for n in axis_names(target) if n in mesh.shape and n not in used)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if size == 1 or dim % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, PartitionSpec(*out))


def check_rules(rules: Rules) -> dict:
    """A copy of ``rules`` after checking every name (typos would silently replicate)."""
    out = {}
    for name, target in rules.items():
        if name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r} in rules; use {LOGICAL_AXES}")
        targets = axis_names(target)
        for t in targets:
            if t not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {t!r}: mesh axes are {MESH_AXES}")
        if name == "layers" and targets not in ((), ("stage",)):
            raise ValueError("layers can only map to 'stage' (pipeline parallelism)")
        if "stage" in targets and name != "layers":
            raise ValueError(f"only 'layers' maps to 'stage'; got {name!r}")
        out[name] = target if target is None or isinstance(target, str) else tuple(target)
    return out


def format_rules(rules: Mapping) -> str:
    """``batch->data  heads,mlp,vocab->tensor  layers->stage``."""
    by_target: dict[str, list[str]] = {}
    for name, target in rules.items():
        if target is None:
            continue
        key = target if isinstance(target, str) else "x".join(target)
        by_target.setdefault(key, []).append(name)
    return "  ".join(f"{','.join(names)}->{t}" for t, names in by_target.items()) or "replicated"
