"""``run_benchmark(cfg) -> dict``: one generation benchmark, the unit every sweep is made of.

A :class:`BenchConfig` names the model (a preset such as ``opt-125m``), the backend
(``jax``: one device, ``alpa``: all devices under ``plan``, ``facebook``: HF torch), dtype,
batch size, prompt length, generated length and repeats.  :func:`run_benchmark` generates
``batch_size`` rows of ``prompt_len`` random prompt tokens for exactly ``new_tokens`` tokens
(EOS ignored) with the model's own ``generate``: ``warmup`` untimed-for-the-median runs (the
first one compiles), then ``repeats`` timed runs, and returns one flat row:

* the full config and its ``cfg_id`` (a stable hash: fields left at their defaults are left
  out, so adding a field later keeps old ids);
* ``latency_s`` (median), ``ttft_s`` (prefill + first token), ``decode_step_ms`` (per decode
  step), ``tokens_per_s`` (generated tokens / latency), ``prefill_tokens_per_s``,
  ``decode_tokens_per_s``; ``compile_s`` (first warm-up run minus the median run, floored
  at 0), ``load_s``;
* memory: ``param_bytes_per_device`` (the most loaded device), ``kv_cache_bytes``,
  ``peak_bytes`` (from ``device.memory_stats()`` where the platform reports it);
* the roofline of one decode step: ``step_gflop`` and ``step_gbyte`` (weights + KV cache
  read), the achieved ``tflops`` / ``gbyte_per_s``, the device's ``peak_tflops`` /
  ``peak_gbyte_per_s`` (measured once per process: a large matmul and a read-only
  reduction) and ``roofline_fraction`` = roofline time bound / measured step time, the
  bound split evenly over the model's devices; ``floor_ms``: the bytes alone at the peak
  bandwidth (the step's bandwidth floor);
* device names, software versions (:func:`environment`), the 1-minute load average (other
  work on a shared machine skews timings) and a timestamp.

:func:`timed_generate` is the one timed call every benchmark here is made of
(``optkit bench textgen`` and ``benchmarks/gpu_decode.py`` too); the FLOP/byte model and
the peaks are :mod:`optkit.bench.roofline`.

Models are loaded through :class:`ModelCache`, so configs sharing (model, backend, plan,
dtype, weights, seed) reuse one loaded model.  Sweeps over many configs live in
:mod:`optkit.bench.sweep`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from optkit.bench.roofline import bandwidth_floor_s, decode_step_cost, device_peaks
from optkit.config import OPTConfig

BACKENDS = ("jax", "alpa", "facebook")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting (every field is recorded in the result row).

    Args:
      model: a preset name (``opt-125m`` ... ``opt-175b``, ``opt-tiny``); ``jax/opt-125m``
        style names set the backend too.
      backend: ``jax`` (one device), ``alpa`` (all visible devices) or ``facebook`` (HF torch).
      plan: ``alpa`` only: a plan string (``"dp=1,tp=2,pp=1"``, ``"dp1-tp2-pp2-mb2"``), a
        ``Plan``, or ``None`` / ``"auto"``: the automatic planner's choice.
      dtype: ``auto`` (fp16 on GPU, fp32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
      batch_size, prompt_len, new_tokens: the generation shape (EOS is ignored).
      repeats: timed runs (the row reports medians); warmup: runs before them (the first
        compiles).
      path: weights (a folder holding ``{model}-np/``, the folder itself or an HF dir);
        ``None`` means random weights.
      seed: weights (when random) and prompt tokens.
      steps_per_dispatch: decode steps per device call (JAX backends; ``None``: generate's
        default).
      do_sample: sample (top-k/top-p off, temperature 1) instead of greedy search.
      quantize: ``None`` or ``"int8"`` (``get_model``'s option; JAX backends).
      kernels: ``get_model``'s decode-kernel choice (``"auto"``, ``"xla"``, ``"pallas"`` or
        names joined by commas; JAX backends).
      hf_cache: ``facebook`` only: ``None`` (transformers' dynamic cache, eager) or
        ``"static"`` (its static cache, whose ``generate`` compiles the decoding forward
        with ``torch.compile``).
      label: free text carried into the row (plots can group by it).
    """

    model: str = "opt-125m"
    backend: str = "jax"
    plan: Any = None
    dtype: str = "auto"
    batch_size: int = 1
    prompt_len: int = 32
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    path: str | None = None
    seed: int = 0
    steps_per_dispatch: int | None = None
    do_sample: bool = False
    quantize: str | None = None
    kernels: str = "auto"
    hf_cache: str | None = None
    label: str = ""

    def __post_init__(self):
        if "/" in self.model:
            backend, short = self.model.split("/", 1)
            object.__setattr__(self, "model", short)
            object.__setattr__(self, "backend", backend)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}")
        for f in ("batch_size", "prompt_len", "new_tokens", "repeats"):
            v = getattr(self, f)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive integer; got {v!r}")
            object.__setattr__(self, f, int(v))
        if not isinstance(self.warmup, int | np.integer) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0; got {self.warmup!r}")
        if self.plan is not None and self.backend != "alpa":
            raise ValueError(f"plan= applies to the alpa backend, not {self.backend!r}")
        if self.backend == "facebook" and (self.quantize or self.kernels != "auto"):
            raise ValueError("quantize= and kernels= apply to the jax and alpa backends")
        if self.hf_cache not in (None, "static"):
            raise ValueError(f"hf_cache must be None or 'static'; got {self.hf_cache!r}")
        if self.hf_cache and self.backend != "facebook":
            raise ValueError("hf_cache= applies to the facebook backend")
        if self.path is not None:
            object.__setattr__(self, "path", str(self.path))
        if self.path is None:
            OPTConfig.from_name(self.model)  # random weights need a known shape

    @property
    def name(self) -> str:
        """``backend/model``, as ``get_model`` spells it."""
        return f"{self.backend}/{self.model}"

    @property
    def plan_text(self) -> str | None:
        if self.plan is None or isinstance(self.plan, str):
            return self.plan
        return getattr(self.plan, "name", None) or repr(self.plan)

    def replace(self, **kw) -> BenchConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """Every field (the plan as text)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["plan"] = self.plan_text
        return d

    def model_key(self) -> tuple:
        """Configs with equal keys share one loaded model."""
        return (self.backend, self.model, self.plan_text if isinstance(self.plan, str | None)
                else repr(self.plan), self.dtype, self.path, self.seed, self.quantize,
                self.kernels)


def as_config(cfg: BenchConfig | dict) -> BenchConfig:
    """A :class:`BenchConfig` from itself or a dict (unknown keys are an error)."""
    if isinstance(cfg, BenchConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise TypeError(f"a benchmark config is a BenchConfig or a dict, not {type(cfg)}")
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown benchmark config keys {unknown}; known: {sorted(names)}")
    return BenchConfig(**cfg)


def cfg_id(cfg: BenchConfig | dict) -> str:
    """A stable 12-hex-digit id of the config (sweeps resume by it); ``label`` is left out,
    and so is every field at its default value."""
    cfg = as_config(cfg)
    defaults = BenchConfig()
    key = {k: v for k, v in cfg.to_dict().items()
           if k != "label" and v != getattr(defaults, k)}
    if not isinstance(cfg.plan, str | None):
        key["plan"] = repr(cfg.plan)
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class ModelCache:
    """Loaded models by :meth:`BenchConfig.model_key`; the least recently used one is dropped
    beyond ``max_models``."""

    def __init__(self, max_models: int = 1):
        self.max_models = max_models
        self.models: OrderedDict[tuple, tuple[Any, float]] = OrderedDict()

    def get(self, cfg: BenchConfig) -> tuple[Any, float]:
        """(model, seconds its load took)."""
        key = cfg.model_key()
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        while len(self.models) >= self.max_models:
            self.models.popitem(last=False)
        from optkit import get_model

        plan = cfg.plan
        if isinstance(plan, str) and plan != "auto":
            from optkit.parallel import Plan

            plan = Plan.parse(plan)
        kw = {"plan": plan} if cfg.backend == "alpa" else {}
        if cfg.backend != "facebook":
            kw.update(quantize=cfg.quantize, kernels=cfg.kernels)
        start = time.perf_counter()
        model = get_model(cfg.name, path=cfg.path, dummy=cfg.path is None, dtype=cfg.dtype,
                          seed=cfg.seed, progress=False, **kw)
        self.models[key] = (model, time.perf_counter() - start)
        return self.models[key]

    def clear(self) -> None:
        self.models.clear()


# --------------------------------------------------------------------------------------------
# What a row records besides timings
# --------------------------------------------------------------------------------------------
def param_bytes_per_device(model) -> int:
    """Parameter bytes held by the most loaded device."""
    executor = getattr(model, "executor", None)
    if executor is None:  # the HF torch model: one device
        return int(sum(p.numel() * p.element_size() for p in model.model.parameters()))
    import jax

    per_device: dict = {}
    for leaf in jax.tree.leaves(executor.params):  # a pipeline's: one tree per stage
        if not hasattr(leaf, "sharding"):
            continue
        shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        for dev in leaf.sharding.device_set:
            per_device[dev] = per_device.get(dev, 0) + shard
    return max(per_device.values(), default=0)


def param_bytes(model) -> int:
    """Bytes of all the model's parameters (each once, however they are placed)."""
    executor = getattr(model, "executor", None)
    if executor is None:
        return int(sum(p.numel() * p.element_size() for p in model.model.parameters()))
    import jax

    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(executor.params)
                   if hasattr(leaf, "nbytes")))


def num_devices(model) -> int:
    mesh = getattr(getattr(model, "executor", None), "mesh", None)
    return 1 if mesh is None else int(mesh.devices.size)


def peak_memory() -> int | None:
    """The first device's peak bytes in use, where the platform reports it (GPUs)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


#: Environment variables that change timings (recorded in every row).
ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS", "JAX_PLATFORMS",
            "CUDA_VISIBLE_DEVICES", "NCCL_PROTO", "NCCL_GRAPH_MIXING_SUPPORT")


def environment() -> dict:
    """Device names, software versions and timing-relevant environment variables."""
    import jax
    import torch
    import transformers

    import optkit

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        **{var.lower(): os.environ.get(var) for var in ENV_VARS},
        "torch_threads": torch.get_num_threads(),
        "jax_device": f"{dev.platform}:{dev.device_kind}", "jax_device_count": jax.device_count(),
        "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__,
        "optkit": optkit.__version__, "host": platform.node(),
    }


@functools.lru_cache(maxsize=1)
def _environment() -> dict:
    return environment()


# --------------------------------------------------------------------------------------------
# The harness: one timed ``generate`` call
# --------------------------------------------------------------------------------------------
class _Stamps:
    """An HF streamer that records when each put() arrives (the first is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync(model) -> None:
    """Wait for a torch model's queued GPU work (JAX calls return finished arrays)."""
    if hasattr(model, "executor"):
        return
    import torch

    if torch.cuda.is_available() and str(getattr(model, "device", "cpu")).startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, ids: np.ndarray, mask: np.ndarray, kwargs: dict) -> dict:
    """One ``model.generate`` call (any optkit model, ``facebook/`` included) with its
    latency, time to the first token and time per decode step.

    JAX models report their prefill and decode times (``return_dict_in_generate``); for the
    torch model a streamer stamps each token as it arrives (not with beams: then the step
    time is the latency over the tokens).
    """
    is_jax = hasattr(model, "executor")
    stamps = _Stamps()
    extra = {}
    if is_jax:
        extra = {"return_dict_in_generate": True}
    elif kwargs.get("num_beams", 1) == 1:
        extra = {"streamer": stamps}
    _sync(model)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **extra)
    seqs = np.asarray(out.sequences if hasattr(out, "sequences") else out)
    latency = time.perf_counter() - start
    new = seqs.shape[1] - ids.shape[1]
    if is_jax:
        tm = out.timings
        ttft = tm["first_token_s"]
        step = tm["decode_s"] / tm["decode_steps"] if tm["decode_steps"] else None
    else:
        ttft = stamps.times[1] - start if len(stamps.times) > 1 else None
        if ttft is not None:
            step = (latency - ttft) / (new - 1) if new > 1 else None
        else:  # beams: no per-token stamps
            step = latency / max(new, 1)
    return {"sequences": seqs, "new_tokens": new, "latency_s": latency, "ttft_s": ttft,
            "decode_step_s": step}


# --------------------------------------------------------------------------------------------
# The unit
# --------------------------------------------------------------------------------------------
def prompt_batch(cfg: BenchConfig, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` rows of ``prompt_len`` random tokens (BOS first), seeded by the cfg."""
    rng = np.random.default_rng(cfg.seed)
    ids = rng.integers(4, vocab_size, (cfg.batch_size, cfg.prompt_len), dtype=np.int64)
    ids[:, 0] = 2  # </s>, OPT's BOS
    return ids, np.ones_like(ids)


def run_benchmark(cfg: BenchConfig | dict, cache: ModelCache | None = None,
                  peaks: dict | str | None = "measure") -> dict:
    """Benchmark one config; returns one flat row (see the module docstring).

    ``cache`` reuses loaded models across calls; ``peaks``: ``"measure"`` (default, once
    per process), a dict with ``peak_gbyte_per_s`` / ``peak_tflops``, or ``None`` (no
    roofline columns).
    """
    cfg = as_config(cfg)
    cache = cache if cache is not None else ModelCache()
    model, load_s = cache.get(cfg)
    mcfg: OPTConfig = model.config
    if cfg.prompt_len + cfg.new_tokens > mcfg.max_position_embeddings:
        raise ValueError(f"prompt_len + new_tokens = {cfg.prompt_len + cfg.new_tokens} exceeds "
                         f"{cfg.model}'s {mcfg.max_position_embeddings} positions")
    ids, mask = prompt_batch(cfg, mcfg.vocab_size)
    kwargs = {"max_new_tokens": cfg.new_tokens, "min_new_tokens": cfg.new_tokens,
              "do_sample": cfg.do_sample}
    if cfg.do_sample:
        kwargs.update(top_k=0, top_p=1.0, temperature=1.0)
    is_jax = hasattr(model, "executor")
    if is_jax and cfg.steps_per_dispatch:
        kwargs["steps_per_dispatch"] = cfg.steps_per_dispatch
    if cfg.hf_cache:
        kwargs["cache_implementation"] = cfg.hf_cache
    runs = []
    for i in range(cfg.warmup + cfg.repeats):
        if cfg.do_sample and is_jax:
            kwargs["seed"] = cfg.seed + i
        elif cfg.do_sample:
            import torch

            torch.manual_seed(cfg.seed + i)
        runs.append(timed_generate(model, ids, mask, kwargs))
    timed = runs[cfg.warmup:]
    if any(r["new_tokens"] != cfg.new_tokens for r in timed):
        raise RuntimeError(f"generate returned {timed[0]['new_tokens']} tokens, expected "
                           f"{cfg.new_tokens}")

    def med(field):
        vals = [r[field] for r in timed if r[field] is not None]
        return statistics.median(vals) if vals else None

    latency, ttft, step = med("latency_s"), med("ttft_s"), med("decode_step_s")
    b, t, n = cfg.batch_size, cfg.prompt_len, cfg.new_tokens
    dtype = str(getattr(model.dtype, "name", model.dtype)).replace("torch.", "")
    itemsize = int(np.dtype({"bfloat16": "float16"}.get(dtype, dtype)).itemsize)
    flops, nbytes = decode_step_cost(mcfg, b, t + n / 2, itemsize)
    nbytes += param_bytes(model) - mcfg.num_params() * itemsize  # int8 kernels: fewer
    row = {
        "cfg_id": cfg_id(cfg), **cfg.to_dict(), "model_name": cfg.name,
        "resolved_dtype": dtype, "resolved_plan": _plan_name(model, cfg),
        "num_devices": num_devices(model), "params": mcfg.num_params(),
        "latency_s": latency,
        "latency_std_s": statistics.stdev([r["latency_s"] for r in timed]) if len(timed) > 1
        else 0.0,
        "ttft_s": ttft, "decode_step_ms": None if step is None else 1e3 * step,
        "tokens_per_s": b * n / latency,
        "prefill_tokens_per_s": b * t / ttft if ttft else None,
        "decode_tokens_per_s": b / step if step else None,
        "warmup_s": runs[0]["latency_s"] if cfg.warmup else None,
        "compile_s": max(0.0, runs[0]["latency_s"] - latency)
        if cfg.warmup and (is_jax or cfg.hf_cache) else None,
        "load_s": load_s,
        "param_bytes_per_device": param_bytes_per_device(model),
        "kv_cache_bytes": mcfg.kv_cache_bytes(b, t + n, itemsize),
        "peak_bytes": peak_memory() if is_jax else None,
        "step_gflop": flops / 1e9, "step_gbyte": nbytes / 1e9,
        "tflops": flops / step / 1e12 if step else None,
        "gbyte_per_s": nbytes / step / 1e9 if step else None,
    }
    row.update(roofline(row, peaks, dtype))
    row["load_avg_1m"] = os.getloadavg()[0]  # other work on the machine skews timings
    row["timestamp"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    row.update(_environment())
    return row


def _plan_name(model, cfg: BenchConfig) -> str | None:
    plan = getattr(model, "plan", None)
    if plan is not None:
        return getattr(plan, "name", None) or str(plan)
    return cfg.plan_text


def roofline(row: dict, peaks: dict | str | None, dtype: str) -> dict:
    """Peak columns, ``floor_ms`` (bytes / peak bandwidth) and ``roofline_fraction``:
    max(FLOPs / peak FLOP/s, bytes / peak bandwidth), split over the row's devices, over the
    measured decode step time (1.0 = on the roofline)."""
    if peaks is None:
        return {"peak_tflops": None, "peak_gbyte_per_s": None, "roofline_fraction": None}
    if peaks == "measure":
        peaks = device_peaks(dtype=dtype if dtype in ("float32", "float16", "bfloat16")
                             else "float32")
    out = {"peak_tflops": peaks.get("peak_tflops"),
           "peak_gbyte_per_s": peaks.get("peak_gbyte_per_s"), "roofline_fraction": None,
           "floor_ms": None}
    step, devices = row["decode_step_ms"], row.get("num_devices", 1)
    if out["peak_gbyte_per_s"]:
        out["floor_ms"] = 1e3 * bandwidth_floor_s(row["step_gbyte"], out["peak_gbyte_per_s"],
                                                  devices)
    if step and out["peak_tflops"] and out["peak_gbyte_per_s"]:
        bound = max(row["step_gflop"] / (1e3 * out["peak_tflops"] * devices),
                    out["floor_ms"] / 1e3)
        out["roofline_fraction"] = bound / (step / 1e3)
    return out
