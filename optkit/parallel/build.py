"""Place a model on devices under a plan: shardings per parameter, sharded loading, executor.

Every parameter's sharding comes from the plan's rules on the sub-mesh of the stage that
holds it, so :func:`optkit.weights.load.load_params` reads each device's slice straight from
the memory-mapped folder (``jax.make_array_from_callback``) and each stage's layers only onto
that stage's devices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optkit.config import OPTConfig
from optkit.options import ModelOptions, dtype_name, resolve_dtype
from optkit.parallel.executor import MeshExecutor
from optkit.parallel.pipeline import PipelineExecutor
from optkit.parallel.placement import Placement
from optkit.parallel.plan import Plan, PlanError, stage_of
from optkit.parallel.stages import split_params
from optkit.parallel.transfer import move
from optkit.quant import load_int8_params, random_int8_params
from optkit.weights.layout import ParamSpec, embed_tokens_spec, param_specs, tree_from_specs
from optkit.weights.load import load_params
from optkit.weights.random import random_params

log = logging.getLogger(__name__)


def resolve_plan_dtype(plan: Plan, dtype, platform: str):
    """The jnp dtype a plan runs in; an explicit ``dtype`` must agree with the plan's."""
    if dtype_name(dtype) != "auto" and plan.dtype != "auto":
        a, b = resolve_dtype(dtype, platform), resolve_dtype(plan.dtype, platform)
        if a != b:
            raise PlanError(f"dtype={dtype} disagrees with the plan's dtype {plan.dtype}")
    return resolve_dtype(plan.dtype if plan.dtype != "auto" else dtype, platform)


def param_shardings(cfg: OPTConfig, plan: Plan, devices: Sequence):
    """``sharding_for(spec, stage=None)``: a parameter's sharding on the sub-mesh of the stage
    that holds it (or of ``stage``), from the plan's rules."""
    ranges = plan.stage_ranges(cfg)
    places = [Placement(cfg, m, plan.rules) for m in plan.stage_meshes(devices)]

    def sharding_for(spec: ParamSpec, stage: int | None = None):
        s = stage_of(spec.path, ranges) if stage is None else stage
        return places[s].param(spec)

    return sharding_for


def zero_params(cfg: OPTConfig, plan: Plan, sharding_for, dtype) -> dict:
    """All-zero params made on their devices, one jitted call per stage (for timing)."""
    specs = param_specs(cfg)
    ranges = plan.stage_ranges(cfg)
    made = {}
    for s in range(plan.pp):
        mine = [p for p in specs if stage_of(p.path, ranges) == s]
        arrays = jax.jit(lambda mine=mine: [jnp.zeros(p.shape, dtype) for p in mine],
                         out_shardings=[sharding_for(p) for p in mine])()
        made.update({p.path: a for p, a in zip(mine, arrays, strict=True)})
    return tree_from_specs(specs, lambda p: made[p.path])


def build_executor(cfg: OPTConfig, plan: Plan, store=None, devices: Sequence | None = None,
                   options: ModelOptions | None = None, seed: int = 0,
                   checksums: bool = False, progress: bool = True,
                   zeros: bool = False) -> MeshExecutor | PipelineExecutor:
    """An executor of ``cfg`` under ``plan`` on the first ``plan.num_devices`` of ``devices``
    (default ``jax.devices()``), with weights from ``store`` (random when ``None``, zeros
    with ``zeros``), loaded and run as ``options`` say (dtype, int8 quantization, decode
    kernels; default :class:`~optkit.options.ModelOptions`)."""
    options = options or ModelOptions()
    quantize = options.quantize
    if zeros and quantize:
        raise ValueError("zeros=True makes full-precision weights; drop quantize")
    plan.validate(cfg)
    devices = list(jax.devices() if devices is None else devices)[:plan.num_devices]
    meshes = plan.stage_meshes(devices)
    jdtype = resolve_plan_dtype(plan, options.dtype, devices[0].platform)
    for note in plan.notes(cfg):
        log.info("plan %s: %s", plan.name, note)
    ranges = plan.stage_ranges(cfg)
    sharding_for = param_shardings(cfg, plan, devices)

    if zeros:
        params = zero_params(cfg, plan, sharding_for, jdtype)
    elif quantize and store is None:
        params = random_int8_params(cfg, seed=seed, dtype=jdtype, sharding_for=sharding_for)
    elif quantize:
        params = load_int8_params(store, cfg, dtype=jdtype, sharding_for=sharding_for,
                                  checksums=checksums, progress=progress)
    elif store is None:
        params = random_params(cfg, seed=seed, dtype=jdtype, sharding_for=sharding_for)
    else:
        params = load_params(store, cfg, dtype=jdtype, sharding_for=sharding_for,
                             checksums=checksums, progress=progress)
    if plan.pp == 1:
        return MeshExecutor(cfg, params, meshes[0], plan.rules, dtype=jdtype, options=options)
    stage_params = split_params(params, ranges)
    # The LM head is tied to the token embedding: the last stage gets its own copy.
    stage_params[-1]["embed_tokens"] = move(params["embed_tokens"],
                                            sharding_for(embed_tokens_spec(cfg),
                                                         stage=plan.pp - 1))
    return PipelineExecutor(cfg, stage_params, plan, devices, dtype=jdtype, options=options)
