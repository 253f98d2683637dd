"""Parallel execution: meshes, sharding-rule tables, plans and executors."""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh

from optkit.api import resolve_dtype
from optkit.config import OPTConfig
from optkit.parallel.executor import MeshExecutor
from optkit.weights.load import load_params
from optkit.weights.random import random_params

log = logging.getLogger(__name__)

#: Megatron-style tensor parallelism: heads, MLP and vocabulary split over "tensor".
TENSOR_RULES = {"batch": "data", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def build_parallel(cfg: OPTConfig, store, dtype="auto", plan=None, seed: int = 0,
                   checksums: bool = False, progress: bool = True):
    """Executor over all visible devices (tensor parallel where the head count allows)."""
    if plan is not None:
        raise NotImplementedError("explicit plans arrive with the planner")
    devices = jax.devices()
    n = len(devices)
    if cfg.num_attention_heads % n:
        log.warning("%d heads do not split over %d devices; running on one device",
                    cfg.num_attention_heads, n)
        devices, n = devices[:1], 1
    mesh = Mesh(np.array(devices).reshape(1, n), ("data", "tensor"))
    jdtype = resolve_dtype(dtype, devices[0].platform)
    probe = MeshExecutor(cfg, {"layers": []}, mesh, TENSOR_RULES, dtype=jdtype)
    if store is None:
        params = random_params(cfg, seed=seed, dtype=jdtype, sharding_for=probe.param_sharding)
    else:
        params = load_params(store, cfg, dtype=jdtype, sharding_for=probe.param_sharding,
                             checksums=checksums, progress=progress)
    return MeshExecutor(cfg, params, mesh, TENSOR_RULES, dtype=jdtype), None
