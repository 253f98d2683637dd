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
from optkit.parallel.executor import MeshExecutor
from optkit.parallel.kernels import check_kernels
from optkit.parallel.pipeline import PipelineExecutor
from optkit.parallel.plan import Plan, PlanError, stage_of
from optkit.parallel.stages import split_params
from optkit.parallel.transfer import move
from optkit.quant import check_quantize, load_int8_params, random_int8_params
from optkit.weights.layout import ParamSpec, embed_tokens_spec, param_specs, tree_from_specs
from optkit.weights.load import load_params
from optkit.weights.random import random_params

log = logging.getLogger(__name__)


def resolve_plan_dtype(plan: Plan, dtype, platform: str):
    """The jnp dtype a plan runs in; an explicit ``dtype`` must agree with the plan's."""
    from optkit.api import resolve_dtype

    if dtype not in (None, "auto") and plan.dtype != "auto":
        a, b = resolve_dtype(dtype, platform), resolve_dtype(plan.dtype, platform)
        if a != b:
            raise PlanError(f"dtype={dtype} disagrees with the plan's dtype {plan.dtype}")
    return resolve_dtype(plan.dtype if plan.dtype != "auto" else dtype, platform)


def param_shardings(cfg: OPTConfig, plan: Plan, devices: Sequence, dtype):
    """``sharding_for(spec, stage=None)``: a parameter's sharding on the sub-mesh of the stage
    that holds it (or of ``stage``), from the plan's rules."""
    ranges = plan.stage_ranges(cfg)
    probes = [MeshExecutor(cfg, {"layers": []}, m, plan.rules, dtype=dtype)
              for m in plan.stage_meshes(devices)]

    def sharding_for(spec: ParamSpec, stage: int | None = None):
        s = stage_of(spec.path, ranges) if stage is None else stage
        return probes[s].param_sharding(spec)

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
                   dtype="auto", seed: int = 0, checksums: bool = False,
                   progress: bool = True, zeros: bool = False, quantize: str | None = None,
                   kernels: str = "auto") -> MeshExecutor | PipelineExecutor:
    """An executor of ``cfg`` under ``plan`` on the first ``plan.num_devices`` of ``devices``
    (default ``jax.devices()``), with weights from ``store`` (random when ``None``, zeros
    with ``zeros``); ``quantize="int8"``: int8 weight-only matmul kernels (``optkit.quant``);
    ``kernels``: the decode step's Pallas kernels, ``"auto"`` (those that apply, on GPUs),
    ``"xla"``, ``"pallas"``, or kernel names joined by commas (``optkit.parallel.kernels``)."""
    check_quantize(quantize)
    check_kernels(kernels)
    if zeros and quantize:
        raise ValueError("zeros=True makes full-precision weights; drop quantize")
    plan.validate(cfg)
    devices = list(jax.devices() if devices is None else devices)[:plan.num_devices]
    meshes = plan.stage_meshes(devices)
    jdtype = resolve_plan_dtype(plan, dtype, devices[0].platform)
    for note in plan.notes(cfg):
        log.info("plan %s: %s", plan.name, note)
    ranges = plan.stage_ranges(cfg)
    sharding_for = param_shardings(cfg, plan, devices, jdtype)

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
        return MeshExecutor(cfg, params, meshes[0], plan.rules, dtype=jdtype,
                            kernels=kernels)
    stage_params = split_params(params, ranges)
    # The LM head is tied to the token embedding: the last stage gets its own copy.
    stage_params[-1]["embed_tokens"] = move(params["embed_tokens"],
                                            sharding_for(embed_tokens_spec(cfg),
                                                         stage=plan.pp - 1))
    return PipelineExecutor(cfg, stage_params, plan, devices, dtype=jdtype,
                            kernels=kernels)


def auto_plan_options(cfg: OPTConfig, plan, dtype, quantize: str | None = None) -> dict:
    """:func:`~optkit.parallel.planner.auto_plan` options for ``plan`` (``None``, ``"auto"``
    or a dict of options): every device, the model's dtype and quantization, a 128-token
    prompt and 32 new tokens (shorter where the model's positions require)."""
    opts = dict(plan) if isinstance(plan, dict) else {}
    if opts.get("quantize", quantize) != quantize:
        raise PlanError(f"the planner options' quantize={opts['quantize']!r} disagrees with "
                        f"quantize={quantize!r}")
    opts["quantize"] = quantize
    opts.setdefault("dtype", dtype)
    opts.setdefault("all_devices", True)
    positions = cfg.max_position_embeddings
    opts.setdefault("prompt_len", min(128, positions // 2))
    opts.setdefault("gen_len", min(32, positions - opts["prompt_len"]))
    return opts


def build_parallel(cfg: OPTConfig, store, dtype="auto", plan=None, seed: int = 0,
                   checksums: bool = False, progress: bool = True, devices=None,
                   quantize: str | None = None, kernels: str = "auto"):
    """``get_model("alpa/...")``: (executor, plan) over all visible devices.

    ``plan`` is a :class:`Plan`, ``None``/``"auto"`` (the planner's choice among plans using
    every device, for batch 1) or a dict of :func:`optkit.parallel.planner.auto_plan` options
    (``{"batch": 8, "all_devices": False, ...}``).  With ``quantize="int8"`` the planner
    sizes and compiles the int8 model.
    """
    check_quantize(quantize)
    devices = list(jax.devices() if devices is None else devices)
    if plan is None or plan == "auto" or isinstance(plan, dict):
        from optkit.parallel.planner import auto_plan

        report = auto_plan(cfg, devices=devices, progress=progress,
                           **auto_plan_options(cfg, plan, dtype, quantize))
        log.info("automatic plan for %s on %d devices:\n%s", cfg.name, len(devices),
                 report.best.describe(cfg, devices, quantize=quantize))
        plan = report.best
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, 'auto' or a dict of planner options; got "
                        f"{type(plan).__name__}")
    executor = build_executor(cfg, plan, store, devices, dtype=dtype, seed=seed,
                              checksums=checksums, progress=progress, quantize=quantize,
                              kernels=kernels)
    return executor, plan
