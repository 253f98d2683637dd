"""The automatic planner: enumerate plans, compile each abstractly, estimate, choose.

For a model, a workload (batch, prompt and generation lengths), a dtype and a cluster (real
devices or a described one) the planner

1. enumerates every ``dp x tp x pp`` whose device count divides the cluster's (and, for
   pipelines, micro-batch counts 1, pp and 2 pp), refusing those that cannot run the model
   (:meth:`Plan.validate`) or cannot split the batch;
2. skips plans whose weights and KV cache alone exceed the memory budget;
3. compiles every stage step (prefill and decode) abstractly -- no weights allocated -- and
   reads XLA's per-device memory, FLOPs, bytes accessed and collectives.  Stages deeper than
   ``max_layers_compiled`` are compiled with 1 and 2 layers and extrapolated linearly;
4. applies a roofline (:class:`CostModel`): a step takes ``max(FLOPs / peak, bytes / HBM
   bandwidth)`` plus ring-collective time over the link or network, and a pipeline adds
   stage-to-stage transfers and the fill/drain bubble of its micro-batches;
5. picks the fastest plan (prefill + (gen_len - 1) decode steps) whose compiled per-device
   memory fits, and says for every candidate why it was chosen or rejected.

With ``measure=True`` the best few are also run on the real devices (random weights) and
re-ranked by measured time.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optkit.config import OPTConfig
from optkit.options import ModelOptions, check_quantize, resolve_dtype
from optkit.parallel.analysis import (
    Cost,
    StageJob,
    compile_jobs,
    compile_jobs_on_fake_cpus,
)
from optkit.parallel.build import build_executor
from optkit.parallel.devices import Cluster, GiB
from optkit.parallel.plan import Plan, PlanError, divisors, split_rows

log = logging.getLogger(__name__)

#: Plans whose estimated time is within this fraction of the fastest count as a tie; the
#: tie goes to the plan with the fewest devices.
TIE = 0.02


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Roofline constants.

    A compiled step takes ``max(FLOPs / (peak * compute_efficiency), traffic / (HBM
    bandwidth * bandwidth_efficiency))`` (FLOPs from ``cost_analysis()``; traffic from
    ``memory_analysis()``, see ``Cost.traffic``) plus ``layer_overhead`` per layer (kernel
    launches and small ops that no roofline sees) plus its collectives: ring all-reduce moves
    ``2 (g-1)/g`` of the bytes over the link (or the network between hosts), all-gather and
    reduce-scatter ``(g-1)/g`` (of the larger side), and each collective costs
    ``collective_latency + hop_latency * (g - 1)`` (network: ``network_latency + 5 *
    hop_latency * (g - 1)``).  A pipeline step adds stage-to-stage transfers, the fill/drain
    bubble of its micro-batches and ``dispatch`` per extra jitted call.

    The decode constants are fitted (``python benchmarks/plans.py --fit``, least squares of
    the relative error, bandwidth efficiency held at 0.90) to optkit's own H200 decode steps:
    opt-1.3b/6.7b/13b on one card, opt-13b/66b tensor-parallel on two, opt-66b/175b on four
    (``benchmarks/plans.py`` ``MEASURED``); ``benchmarks/results/plans.md`` compares them.
    0.90 of an H200's 4.8 TB/s is about the read bandwidth measured on the cards; fitted
    freely it goes to 0.96, with the per-layer overhead taking up the difference.  The
    network and ``dispatch`` constants were not measured (no multi-host machine was lent).
    """

    compute_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.90
    layer_overhead: float = 27e-6
    collective_latency: float = 12.5e-6
    network_latency: float = 60e-6
    hop_latency: float = 3e-6
    dispatch: float = 30e-6

    def latency(self, spans_hosts: bool, g: int) -> float:
        if spans_hosts:
            return self.network_latency + 5 * self.hop_latency * (g - 1)
        return self.collective_latency + self.hop_latency * (g - 1)

    def step(self, cost: Cost, cluster: Cluster, first_device: int, devices: int,
             layers: int) -> dict:
        """Seconds for one compiled step of ``layers`` layers on a sub-mesh of ``devices``
        devices starting at ``first_device``."""
        d = cluster.device
        compute = cost.flops / (d.flops * self.compute_efficiency)
        memory = cost.traffic / (d.hbm_bandwidth * self.bandwidth_efficiency)
        comm = 0.0
        for key, (count, nbytes) in cost.collectives.items():
            op, g = key.split(":")
            g = int(g)
            if g <= 1 or count <= 0:
                continue
            spans = any(cluster.spans_hosts(first_device + i, g)
                        for i in range(0, max(devices, g), g))
            bw = cluster.inter_host_bandwidth if spans else d.link_bandwidth
            if op == "all-reduce":
                moved = 2 * (g - 1) / g * nbytes
            elif op == "reduce-scatter":
                moved = (g - 1) * nbytes
            elif op in ("all-gather", "all-to-all"):
                moved = (g - 1) / g * nbytes
            else:  # point to point
                moved = nbytes
            comm += moved / bw + count * self.latency(spans, g)
        overhead = layers * self.layer_overhead
        return {"compute": compute, "memory": memory, "comm": comm, "overhead": overhead,
                "time": max(compute, memory) + comm + overhead}


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 32

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.gen_len


@dataclasses.dataclass
class Candidate:
    """One plan's verdict.  Times in seconds, memory in bytes per device (worst stage)."""

    plan: Plan
    status: str = "invalid"  # chosen | fits | over budget | invalid
    reason: str = ""
    memory: float | None = None  # compiled (extrapolated) peak
    analytic: float | None = None  # weights + KV cache from shapes
    weights: float | None = None
    kv_cache: float | None = None
    prefill: float | None = None
    decode: float | None = None
    total: float | None = None
    decode_parts: dict | None = None  # compute / memory / comm / pipeline of one token
    prefill_parts: dict | None = None
    extrapolated: bool = False
    measured_prefill: float | None = None
    measured_decode: float | None = None

    @property
    def fits(self) -> bool:
        return self.status in ("chosen", "fits")


@dataclasses.dataclass
class PlanReport:
    """Every candidate with its estimates; ``best`` is the chosen plan."""

    cfg: OPTConfig
    cluster: Cluster
    workload: Workload
    dtype: str
    candidates: list[Candidate]
    notes: list[str]
    quantize: str | None = None

    @property
    def best(self) -> Plan | None:
        return next((c.plan for c in self.candidates if c.status == "chosen"), None)

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.status == "chosen"), None)

    def refusal(self) -> str:
        """Why no plan was chosen (the message :func:`auto_plan` raises)."""
        w, cluster = self.workload, self.cluster
        sized = [c for c in self.candidates if c.analytic is not None]
        if not sized:
            return (f"no plan can run {self.cfg.name} on {cluster.count} devices: "
                    + "; ".join(sorted({c.reason for c in self.candidates}))[:2000])
        least = min(sized, key=lambda c: c.memory or c.analytic)
        need = (least.memory or least.analytic) / GiB
        weights = f"{self.dtype}, int8 kernels" if self.quantize else self.dtype
        return (f"no plan for {self.cfg.name} ({weights}, batch {w.batch}, {w.cache_len} "
                f"positions) fits {cluster.count} x {cluster.device.name} with a budget of "
                f"{cluster.budget / GiB:.2f} GiB/device: the smallest, {least.plan.name}, needs "
                f"{need:.2f} GiB/device; use more or larger devices, a 16-bit dtype"
                f"{'' if self.quantize else ', int8 weights (quantize=int8)'}, or a "
                f"smaller batch or sequence")

    def to_frame(self):
        """The candidates as a pandas DataFrame (one row per plan, best first)."""
        import pandas as pd

        def ms(x):
            return None if x is None else x * 1e3

        def gib(x):
            return None if x is None else x / GiB

        rows = []
        for c in self.candidates:
            p = c.plan
            parts = c.decode_parts or {}
            pre = c.prefill_parts or {}
            rows.append({
                "plan": p.name, "quantize": self.quantize, "dp": p.dp, "tp": p.tp, "pp": p.pp,
                "micro_batches": p.micro_batches, "devices": p.num_devices,
                "status": c.status, "memory_gib": gib(c.memory),
                "analytic_gib": gib(c.analytic), "budget_gib": self.cluster.budget / GiB,
                "prefill_ms": ms(c.prefill), "decode_ms": ms(c.decode),
                "total_s": c.total,
                "tokens_per_s": (self.workload.batch * self.workload.gen_len / c.total
                                 if c.total and self.workload.gen_len else None),
                "prefill_compute_ms": ms(pre.get("compute")),
                "prefill_memory_ms": ms(pre.get("memory")),
                "prefill_comm_ms": ms(pre.get("comm")),
                "prefill_overhead_ms": ms(pre.get("overhead")),
                "decode_compute_ms": ms(parts.get("compute")),
                "decode_memory_ms": ms(parts.get("memory")),
                "decode_comm_ms": ms(parts.get("comm")),
                "decode_overhead_ms": ms(parts.get("overhead")),
                "decode_pipeline_ms": ms(parts.get("pipeline")),
                "measured_prefill_ms": ms(c.measured_prefill),
                "measured_decode_ms": ms(c.measured_decode),
                "extrapolated": c.extrapolated, "reason": c.reason})
        return pd.DataFrame(rows)

    def header(self) -> str:
        w = self.workload
        weights = f"{self.dtype} with int8 matmul kernels" if self.quantize else self.dtype
        return (f"{self.cfg.name} ({self.cfg.num_params() / 1e9:.3g}B params, "
                f"{self.cfg.num_hidden_layers} layers, {self.cfg.num_attention_heads} heads), "
                f"{weights}, batch {w.batch}, prompt {w.prompt_len} + {w.gen_len} new "
                f"tokens\non {self.cluster.describe()}")

    def table(self, limit: int | None = None, invalid: bool = False) -> str:
        """One line per candidate (best first); invalid plans are counted unless
        ``invalid``."""
        head = ("plan", "dev", "mem/dev", "analytic", "prefill", "decode/tok", "total",
                "status: reason")
        shown = [c for c in self.candidates if invalid or c.status != "invalid"][:limit]
        hidden = sum(c.status == "invalid" for c in self.candidates) - sum(
            c.status == "invalid" for c in shown)
        rows = []
        for c in shown:
            def f(x, unit, scale):
                return "-" if x is None else f"{x / scale:,.2f} {unit}"
            pre, dec = f(c.prefill, "ms", 1e-3), f(c.decode, "ms", 1e-3)
            if c.measured_decode is not None:
                pre = f"{f(c.measured_prefill, 'ms', 1e-3)} (est {c.prefill * 1e3:,.2f})"
                dec = f"{f(c.measured_decode, 'ms', 1e-3)} (est {c.decode * 1e3:,.2f})"
            rows.append((c.plan.name, str(c.plan.num_devices), f(c.memory, "GiB", GiB),
                         f(c.analytic, "GiB", GiB), pre, dec, f(c.total, "s", 1),
                         f"{c.status}: {c.reason}"))
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
        lines = ["  ".join(x.ljust(widths[i]) for i, x in enumerate(r[:-1])) + "  " + r[-1]
                 for r in [head] + rows]
        if hidden > 0:
            lines.append(f"(+ {hidden} invalid plans not shown: the model's heads or layers or "
                         f"the batch rows do not split over them)")
        return "\n".join(lines)

    def __str__(self) -> str:
        out = [self.header(), *[f"note: {n}" for n in self.notes], "", self.table()]
        if self.best is not None:
            out += ["", "chosen plan:", self.best.describe(self.cfg, batch=self.workload.batch,
                                                           seq_len=self.workload.cache_len,
                                                           quantize=self.quantize)]
        return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Enumeration
# --------------------------------------------------------------------------------------------
def enumerate_plans(cfg: OPTConfig, num_devices: int, batch: int, dtype: str = "auto",
                    micro_batches: Sequence[int] | None = None,
                    all_devices: bool = False) -> list[Plan]:
    """Every dp x tp x pp whose device count divides ``num_devices`` (equals it with
    ``all_devices``), with micro-batch counts 1 and pp for pipelines (or the given ones)."""
    ds = divisors(num_devices)
    plans = []
    for pp, tp, dp in itertools.product(ds, ds, ds):
        n = dp * tp * pp
        if num_devices % n or (all_devices and n != num_devices):
            continue
        ms = [1] if pp == 1 else sorted({m for m in (micro_batches or (1, pp)) if m <= batch})
        for m in ms:
            plans.append(Plan(dp=dp, tp=tp, pp=pp, micro_batches=m, dtype=dtype))
    return plans


def _structural_check(cfg: OPTConfig, plan: Plan, w: Workload) -> str | None:
    try:
        plan.validate(cfg, w.batch)
    except PlanError as e:
        return str(e)
    sizes = {hi - lo for lo, hi in split_rows(w.batch, plan.micro_batches)}
    if plan.dp > 1 and any(s % plan.dp for s in sizes):
        return (f"micro-batches of {sorted(sizes)} rows do not split over dp={plan.dp} "
                f"(rows would be computed redundantly)")
    return None


# --------------------------------------------------------------------------------------------
# Jobs and their costs
# --------------------------------------------------------------------------------------------
def _stage_jobs(cfg, plan: Plan, w: Workload, dtype: str, max_layers: int,
                quantize: str | None = None) -> list[dict]:
    """Per stage and step kind: {"exact": job} or {"base", "ref1", "ref2", "n"} jobs."""
    rules = tuple(sorted(plan.rules.items(), key=lambda kv: kv[0]))
    mb = max(hi - lo for lo, hi in split_rows(w.batch, plan.micro_batches))
    out = []
    for s, n in enumerate(plan.stage_layers(cfg)):
        first, last = s == 0, s == plan.pp - 1
        per_kind = {}
        for kind in ("prefill", "decode"):
            def job(first, last, layers, kind=kind):
                # Inference is data-parallel without communication: each replica runs the
                # dp=1 program on mb / dp rows, so that is what is compiled (and shared).
                return StageJob(kind, 1, plan.tp, rules, mb // plan.dp,
                                w.prompt_len if kind == "prefill" else 1, w.cache_len,
                                first, last, layers, dtype, quantize)
            if n <= max_layers:
                per_kind[kind] = {"exact": job(first, last, n)}
            else:  # the per-layer slope comes from the first stage's 1- and 2-layer compiles
                ref = (True, plan.pp == 1)
                per_kind[kind] = {"base": job(first, last, 1), "ref1": job(*ref, 1),
                                  "ref2": job(*ref, 2), "n": n}
        out.append(per_kind)
    return out


def _resolve(spec: dict, costs: dict) -> Cost:
    if "exact" in spec:
        return costs[spec["exact"]]
    slope = costs[spec["ref2"]].combine(costs[spec["ref1"]], 1.0, -1.0)
    return costs[spec["base"]].combine(slope, 1.0, spec["n"] - 1)


_COSTS: dict = {}


def _compile_all(cfg: OPTConfig, jobs: list[StageJob], cluster: Cluster,
                 progress: bool) -> dict:
    if cluster.devices is not None:
        backend = f"{cluster.devices[0].platform}:{len(cluster.devices)}"
    else:
        backend = "fake-cpu"
    todo = [j for j in dict.fromkeys(jobs) if (cfg, j, backend) not in _COSTS]
    if todo:
        if cluster.devices is not None:
            costs = compile_jobs(cfg, todo, cluster.devices, progress)
        else:
            need = max(j.dp * j.tp for j in todo)
            costs = compile_jobs_on_fake_cpus(cfg, todo, need, progress)
        for j, c in zip(todo, costs, strict=True):
            _COSTS[(cfg, j, backend)] = c
    return {j: _COSTS[(cfg, j, backend)] for j in jobs}


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------
def auto_plan(cfg: OPTConfig | str, batch: int = 1, prompt_len: int = 128, gen_len: int = 32,
              dtype="auto", devices: Sequence[jax.Device] | None = None,
              cluster: Cluster | None = None, plans: Sequence[Plan] | None = None,
              micro_batches: Sequence[int] | None = None, all_devices: bool = False,
              max_layers_compiled: int = 2,
              cost_model: CostModel | None = None, measure: bool = False,
              measure_top: int = 3, progress: bool = True, strict: bool = True,
              quantize: str | None = None) -> PlanReport:
    """Choose a plan for ``cfg`` (see the module docstring).

    Args:
      cfg: an :class:`OPTConfig` or a preset name (``opt-175b``).
      batch, prompt_len, gen_len: the workload the plan is tuned for.
      dtype: ``auto`` (fp16 on accelerators, fp32 on CPU) or a dtype name.
      devices: real devices to plan for (default ``jax.devices()``), or
      cluster: a described :class:`Cluster` (compiled on fake CPU devices).
      plans: evaluate only these plans (default: enumerate all).
      micro_batches: micro-batch counts tried for pipelines (default 1 and pp).
      all_devices: only plans that use every device.
      max_layers_compiled: stages with more layers are extrapolated from 1- and 2-layer
        compiles.
      measure: time the ``measure_top`` best on the real devices and re-rank.
      strict: raise :class:`PlanError` (with ``.report``) when nothing fits.
      quantize: ``"int8"``: plan for int8 matmul kernels (``get_model(..., quantize="int8")``;
        weights sized and compiled as int8, the rest in ``dtype``).
    """
    check_quantize(quantize)
    if isinstance(cfg, str):
        cfg = OPTConfig.from_name(cfg)
    if cluster is None:
        cluster = Cluster.from_devices(devices)
    if measure and cluster.devices is None:
        raise ValueError("measure=True needs real devices (devices=..., not a described "
                         "cluster)")
    cost_model = cost_model or CostModel()
    w = Workload(batch, prompt_len, gen_len)
    if min(batch, prompt_len) < 1 or gen_len < 0:
        raise ValueError(f"batch and prompt_len must be >= 1 and gen_len >= 0; got {w}")
    if w.cache_len > cfg.max_position_embeddings:
        raise ValueError(f"prompt_len + gen_len = {w.cache_len} exceeds {cfg.name}'s "
                         f"{cfg.max_position_embeddings} positions")
    name = resolve_dtype(dtype, cluster.device.platform).name
    itemsize = jnp.dtype(name).itemsize
    compile_on_cpu = cluster.devices is None or cluster.devices[0].platform == "cpu"
    compile_dtype, scale = name, 1.0
    notes = []
    if compile_on_cpu and itemsize == 2:
        compile_dtype, scale = "float32", 0.5
        notes.append("compiled on CPU in float32 (XLA:CPU computes 16-bit matmuls in f32): "
                     "weight, cache and collective bytes halved, temporaries kept at f32 size")
    if cluster.devices is None:
        notes.append(f"compiled on {cluster.count} fake CPU devices, no weights allocated")
    # XLA:CPU keeps widened copies of int8 kernels as temporaries (a GPU fuses the widening
    # into the product), so on CPU the full-precision model is compiled and its kernel bytes
    # are swapped for the int8 ones from the shapes.
    compile_quantize = None if compile_on_cpu else quantize
    if quantize and compile_on_cpu:
        notes.append("int8 kernels compiled as full-precision ones on CPU; their bytes replaced "
                     "by the int8 kernels' and scales' from the shapes")
    if plans is None:
        plans = enumerate_plans(cfg, cluster.count, batch, name, micro_batches, all_devices)
    else:
        plans = [p if p.dtype != "auto" else p.replace(dtype=name) for p in plans]
        for p in plans:
            if p.num_devices > cluster.count:
                raise PlanError(f"plan {p.name} needs {p.num_devices} devices; the cluster "
                                f"has {cluster.count}")

    cands, todo = [], []
    for plan in plans:
        c = Candidate(plan)
        cands.append(c)
        err = _structural_check(cfg, plan, w)
        if err:
            c.reason = err
            continue
        mem = plan.stage_memory(cfg, batch, w.cache_len, itemsize, quantize)
        worst = max(range(plan.pp), key=lambda s: mem[s]["weights"] + mem[s]["kv_cache"])
        c.weights, c.kv_cache = mem[worst]["weights"], mem[worst]["kv_cache"]
        c.analytic = c.weights + c.kv_cache
        if c.analytic > cluster.budget:
            c.status = "over budget"
            c.reason = (f"weights + KV cache alone need {c.analytic / GiB:.2f} GiB/device > "
                        f"budget {cluster.budget / GiB:.2f} GiB (not compiled)")
            continue
        if quantize and not compile_quantize:
            full = plan.stage_memory(cfg, batch, w.cache_len, itemsize)
            for s, m in enumerate(mem):
                m["swap"] = full[s]["weights"] - m["weights"]
        todo.append((c, _stage_jobs(cfg, plan, w, compile_dtype, max_layers_compiled,
                                    compile_quantize), mem))

    jobs = [j for _, stages, _ in todo for per in stages for spec in per.values()
            for k, j in spec.items() if k != "n"]
    costs = _compile_all(cfg, jobs, cluster, progress)
    for c, stages, mem in todo:
        _estimate(c, stages, mem, costs, scale, cfg, cluster, w, cost_model, itemsize)

    _rank(cands, cluster)
    report = PlanReport(cfg, cluster, w, name, cands, notes, quantize)
    if measure and report.best is not None:
        _measure(report, measure_top, progress)
    if strict and report.best is None:
        err = PlanError(report.refusal())
        err.report = report
        raise err
    return report


def _estimate(c: Candidate, stages, mem, costs, scale, cfg, cluster, w, model: CostModel,
              itemsize):
    plan = c.plan
    k = plan.dp * plan.tp
    rows = split_rows(w.batch, plan.micro_batches)
    mb = max(hi - lo for lo, hi in rows)
    m = len(rows)
    peak, times = 0.0, {"prefill": [], "decode": []}
    parts = {kind: {"compute": 0.0, "memory": 0.0, "comm": 0.0, "overhead": 0.0}
             for kind in times}
    depth = plan.stage_layers(cfg)
    for s, per in enumerate(stages):
        live = 0.0
        for kind, spec in per.items():
            cost = _resolve(spec, costs).scaled(scale) if scale != 1 else _resolve(spec, costs)
            if mem[s].get("swap"):  # full-precision kernels compiled for int8 ones (CPU)
                cost = dataclasses.replace(cost, argument=cost.argument - mem[s]["swap"])
            c.extrapolated |= "exact" not in spec
            live = max(live, cost.live)
            t = model.step(cost, cluster, s * k, k, depth[s])
            times[kind].append(t["time"])
            for key in parts[kind]:
                parts[kind][key] += t[key]
        # caches of the other micro-batches stay resident too
        one_mb = mem[s]["kv_cache"] * mb / w.batch
        peak = max(peak, live + mem[s]["kv_cache"] - one_mb)
    c.memory = peak

    def pipeline(kind: str, tokens: int) -> float:
        ts = times[kind]
        if plan.pp == 1:
            return ts[0]
        act = mb * tokens * cfg.hidden_size * itemsize / plan.dp
        hops = [act / cluster.bandwidth(s * k, 2 * k)
                + model.latency(cluster.spans_hosts(s * k, 2 * k), 2)
                for s in range(plan.pp - 1)]
        slowest = max(ts + hops)
        return sum(ts) + sum(hops) + (m - 1) * slowest + model.dispatch * (plan.pp * m - 1)

    c.prefill = pipeline("prefill", w.prompt_len)
    c.decode = pipeline("decode", 1)
    c.total = c.prefill + max(0, w.gen_len - 1) * c.decode
    for kind, total in (("prefill", c.prefill), ("decode", c.decode)):
        parts[kind]["pipeline"] = total - sum(times[kind]) if plan.pp > 1 else 0.0
    c.prefill_parts, c.decode_parts = parts["prefill"], parts["decode"]
    if c.memory > cluster.budget:
        c.status = "over budget"
        c.reason = (f"compiled peak {c.memory / GiB:.2f} GiB/device > budget "
                    f"{cluster.budget / GiB:.2f} GiB")
    else:
        c.status = "fits"


def _rank(cands: list[Candidate], cluster: Cluster, measured: bool = False) -> None:
    """Mark the fastest fitting candidate (among the measured ones, after measuring) chosen
    and sort: chosen, fitting (measured first), over budget, invalid."""
    def done(c):
        return c.measured_decode is not None

    pool = sorted([c for c in cands if c.fits and (done(c) or not measured)],
                  key=lambda c: (c.total, c.plan.num_devices))
    if pool:  # near-ties (within TIE) go to the plan that needs the fewest devices
        near = [c for c in pool if c.total <= pool[0].total * (1 + TIE)]
        first = min(near, key=lambda c: (c.plan.num_devices, c.total))
        pool.remove(first)
        pool.insert(0, first)
    for c in cands:
        if c.status == "chosen":
            c.status = "fits"
    if pool:
        best = pool[0]
        best.status = "chosen"
        how = "measured" if measured else "estimated"
        runner = pool[1] if len(pool) > 1 else None
        pre, dec = ((best.measured_prefill, best.measured_decode) if measured
                    else (best.prefill, best.decode))
        best.reason = (f"fastest that fits ({how}): {pre * 1e3:,.2f} ms prefill + "
                       f"{dec * 1e3:,.3f} ms/token, {best.memory / GiB:.2f} of "
                       f"{cluster.budget / GiB:.2f} GiB/device"
                       + ("" if runner is None else
                          f"; {runner.plan.name} is as fast within {TIE:.0%} but needs "
                          f"{runner.plan.num_devices} devices" if runner.total < best.total else
                          f"; next best {runner.plan.name} takes {runner.total / best.total:.2f}x "
                          f"the time"))
        for c in pool[1:]:
            if c.total <= pool[0].total * (1 + TIE) or c.total < best.total:
                c.reason = (f"fits ({c.memory / GiB:.2f} GiB/device), within {TIE:.0%} of "
                            f"{best.plan.name} ({how}) but uses more devices")
            else:
                c.reason = (f"fits ({c.memory / GiB:.2f} GiB/device) but "
                            f"{c.total / best.total:.2f}x slower ({how}) than {best.plan.name}")
        for c in cands:
            if measured and c.fits and not done(c):
                c.reason = (f"fits ({c.memory / GiB:.2f} GiB/device); estimated "
                            f"{c.total:.3g} s, not among the measured best")
    order = {"chosen": 0, "fits": 1, "over budget": 2, "invalid": 3}
    cands.sort(key=lambda c: (order[c.status], not done(c),
                              c.total if c.total is not None else np.inf, c.plan.num_devices))


def _measure(report: PlanReport, top: int, progress: bool) -> None:
    """Time the ``top`` best plans on the real devices (zero weights: the same work) and
    re-rank."""
    cfg, w = report.cfg, report.workload
    devices = report.cluster.devices
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (w.batch, w.prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    steps = max(1, min(w.gen_len - 1, 8))
    measured = [c for c in report.candidates if c.fits][:top]
    for c in measured:
        # zero weights (random int8 ones for an int8 plan): the same work
        options = ModelOptions(dtype=report.dtype, quantize=report.quantize)
        ex = build_executor(cfg, c.plan, None, devices, options, progress=False,
                            zeros=not report.quantize)
        for _ in range(2):  # the first round compiles
            t0 = time.perf_counter()
            cache = ex.init_cache(w.batch, w.cache_len)
            logits, cache = ex.prefill(ids, mask, cache)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            jax.block_until_ready(tok)
            t1 = time.perf_counter()
            tok, cache, _, _ = ex.decode_loop(_greedy, tok, cache, (), steps)
            jax.block_until_ready(tok)
            t2 = time.perf_counter()
        c.measured_prefill, c.measured_decode = t1 - t0, (t2 - t1) / steps
        log.info("measured %s: prefill %.2f ms, decode %.3f ms/token", c.plan.name,
                 c.measured_prefill * 1e3, c.measured_decode * 1e3)
        del ex, cache
    report.notes.append(f"measured the {len(measured)} best estimates on "
                        f"{report.cluster.device.name} and re-ranked them by measured time")
    for c in measured:
        c.total = c.measured_prefill + max(0, w.gen_len - 1) * c.measured_decode
    _rank(report.candidates, report.cluster, measured=True)


def _greedy(logits, state):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, state, tok


# --------------------------------------------------------------------------------------------
# get_model("alpa/...")
# --------------------------------------------------------------------------------------------
def auto_plan_options(cfg: OPTConfig, plan, options: ModelOptions) -> dict:
    """:func:`auto_plan` options for ``plan`` (``None``, ``"auto"`` or a dict of options):
    every device, the model's dtype and quantization (``options``), a 128-token prompt and
    32 new tokens (shorter where the model's positions require)."""
    dtype, quantize = options.dtype, options.quantize
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


def build_parallel(cfg: OPTConfig, store, options: ModelOptions | None = None, plan=None,
                   seed: int = 0, checksums: bool = False, progress: bool = True,
                   devices=None):
    """``get_model("alpa/...")``: (executor, plan) over all visible devices, loaded and run
    as ``options`` say.

    ``plan`` is a :class:`Plan`, ``None``/``"auto"`` (the planner's choice among plans using
    every device, for batch 1) or a dict of :func:`auto_plan` options (``{"batch": 8,
    "all_devices": False, ...}``).  For an int8 model the planner sizes and compiles int8
    kernels.
    """
    options = options or ModelOptions()
    devices = list(jax.devices() if devices is None else devices)
    if plan is None or plan == "auto" or isinstance(plan, dict):
        report = auto_plan(cfg, devices=devices, progress=progress,
                           **auto_plan_options(cfg, plan, options))
        log.info("automatic plan for %s on %d devices:\n%s", cfg.name, len(devices),
                 report.best.describe(cfg, devices, quantize=options.quantize))
        plan = report.best
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, 'auto' or a dict of planner options; got "
                        f"{type(plan).__name__}")
    executor = build_executor(cfg, plan, store, devices, options, seed=seed,
                              checksums=checksums, progress=progress)
    return executor, plan
