"""Serving on one GPU: optkit's scheduler + engine vs HF transformers' continuous batching.

Both serve the same synthesized requests in the same run (random fp16 weights of the same
OPT config; EOS ignored, greedy, so every request does the same work everywhere):

* ``offline``: all requests submitted at once; generated tokens/s, total time, TTFT / TPOT /
  ITL percentiles, the largest decode batch reached.  optkit's run also gets the same run's
  **ideal bound** (row ``kind="ideal"``): the prompts' FLOPs at the matmul rate measured in
  the same process (an ``n x n x n`` product, ``--matmul-size``) plus
  ``max(ceil(sum(max_tokens - 1) / B), max(max_tokens) - 1)`` decode steps at the step time
  of the public ``model.generate()`` at the batch ``B`` the engine reached (greedy, context =
  mean prompt + half the mean output); ``fraction_of_ideal`` = ideal time / measured time.
* ``online``: Poisson arrivals (``optkit.bench.loadgen.arrival_times``) at each of
  ``--rates`` from an arrival thread; per rate ``max(--online-min-requests,
  rate x --online-seconds)`` requests (at most ``--num-requests``); the sweep of a framework
  stops after a rate it cannot keep up with (requests unfinished ``--drain-s`` after the
  last arrival, or p99 TTFT over ``--stop-ttft-s``).  A ``slo_capacity`` row gives the
  highest rate whose p99 TTFT <= ``--slo-ttft-ms`` and p99 TPOT <= ``--slo-tpot-ms``.
* ``stall``: one stream generating ``--stall-stream-tokens`` tokens; ``--stall-delay`` s
  later a ``--stall-long``-token prompt arrives.  The row gives the stream's largest gap
  between deliveries after that arrival against its median gap, and against the time to
  first token of one ``--chunk-tokens`` prompt alone (one chunk's prefill; HF: its resolved
  ``max_batch_tokens``).  The scenario runs twice; the second is reported.

Timing is taken the way ``optkit.bench.loadgen`` takes it on a client, here in process:
submit time, then the time each delivery of tokens reaches the caller (optkit: the
scheduler's ``on_output`` callback; HF: the manager's per-token ``record_timestamps``);
TTFT = first delivery - submit, TPOT = (last - first) / (tokens - 1), ITL = gap / tokens
delivered.  Rows are loadgen's :func:`~optkit.bench.loadgen.summarize` rows plus this
script's fields.  Before a workload is timed on a fresh engine, ``--warmup-requests`` of
its requests (spread over the prompt lengths, with the longest prompt, context and output;
outputs cut to ``--warmup-max-tokens``) run once: compiles and CUDA-graph captures land
there, reported as ``warmup_s``; engine construction is ``setup_s`` (optkit's includes
``PagedEngine.warmup``, as ``optkit serve`` runs it before answering), model creation
``init_s``.  The parts run in the order offline, stall, online (the sweep last: it runs
until the framework falls behind); ``--budget-s`` bounds each (model, framework): parts
that would start later are skipped (a ``skipped`` row says so).

Request lengths (no data download):

* ``uniform``: prompts uniform in ``--uniform-prompt`` (32-512) tokens, ``--uniform-output``
  (128) new tokens each -- the workload of optkit's issue on GPU serving speed.
* ``sharegpt`` / ``alpaca``: lognormal input and output lengths whose means are the ones the
  vLLM paper reports for its datasets (Kwon et al., "Efficient Memory Management for Large
  Language Model Serving with PagedAttention", SOSP 2023, Fig. 11): ShareGPT mean input
  161.31 and mean output 337.99 tokens; Alpaca mean input 19.31 and mean output 58.45
  tokens.  The paper gives the means and histograms, not a spread: the log-space standard
  deviations (ShareGPT 1.0 input / 0.9 output, Alpaca 0.6 / 0.8) are this script's choice
  for heavy right tails like the histograms'.  Lengths are clipped to the context (prompt
  <= context - 1, prompt + output <= context) and the medians are calibrated so that the
  *clipped* means equal the paper's; draws are stratified (one per quantile stratum), so
  a few hundred requests already have close to the stated means.  Every row records the
  drawn means.

Runs on the GPU machine with what it has (jax, torch, transformers; no network).  Each
(model, framework) runs in its own subprocess, so the two allocators never share the card
(``--in-process`` runs them in this process: tests, CPUs).  ``optkit.serve`` imports
FastAPI, uvicorn and pydantic: carry their wheels where they are missing.  Rows are
appended to ``--out``/serve_gpu.jsonl as each is measured; plots and summary.md follow
(``--report ROWS.jsonl`` redoes them from committed rows)::

    python benchmarks/serve_gpu.py --models opt-6.7b --frameworks optkit
    python benchmarks/serve_gpu.py --models opt-13b --frameworks hf --parts offline online
    python benchmarks/serve_gpu.py --report benchmarks/results/serve_gpu/serve_gpu.jsonl

The engine is built in one function, :func:`build_engine` (``--engine-opt KEY=VALUE``
passes keyword arguments to it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's optkit

ROWS = "serve_gpu.jsonl"
PARTS = ("offline", "online", "stall")
FRAMEWORKS = ("optkit", "hf")


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LengthStats:
    """Published mean lengths (tokens) and the log-space spreads drawn around them."""

    input_mean: float
    output_mean: float
    input_sigma: float
    output_sigma: float
    source: str


VLLM_FIG11 = "vLLM paper (Kwon et al., SOSP 2023), Fig. 11"
DATASETS = {
    "sharegpt": LengthStats(161.31, 337.99, 1.0, 0.9, VLLM_FIG11 + " (a) ShareGPT"),
    "alpaca": LengthStats(19.31, 58.45, 0.6, 0.8, VLLM_FIG11 + " (b) Alpaca"),
}
WORKLOADS = ("uniform", *DATASETS)
_CALIBRATION_SAMPLES = 100_000


def _normal_strata(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` standard normal draws, one from each of ``n`` equal-probability strata, in a
    random order."""
    u = (rng.permutation(n) + rng.random(n)) / n
    inv = statistics.NormalDist().inv_cdf
    return np.array([inv(min(max(x, 1e-12), 1 - 1e-12)) for x in u])


def _clipped(stats: LengthStats, z_in, z_out, med_in: float, med_out: float,
             max_context: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.clip(np.rint(med_in * np.exp(stats.input_sigma * z_in)), 1, max_context - 1)
    o = np.clip(np.rint(med_out * np.exp(stats.output_sigma * z_out)), 1, max_context - p)
    return p.astype(int), o.astype(int)


@functools.cache
def calibrated_medians(name: str, max_context: int) -> tuple[float, float]:
    """Medians of the input / output lognormals whose lengths, clipped to ``max_context``,
    have the dataset's published means (as far as the context allows)."""
    s = DATASETS[name]
    rng = np.random.default_rng(20231023)
    z_in = _normal_strata(_CALIBRATION_SAMPLES, rng)
    z_out = _normal_strata(_CALIBRATION_SAMPLES, rng)
    med_in = s.input_mean * math.exp(-s.input_sigma ** 2 / 2)
    med_out = s.output_mean * math.exp(-s.output_sigma ** 2 / 2)
    for _ in range(60):
        p, o = _clipped(s, z_in, z_out, med_in, med_out, max_context)
        med_in = min(med_in * s.input_mean / p.mean(), max_context)
        med_out = min(med_out * s.output_mean / o.mean(), max_context)
    return med_in, med_out


def synthesize_lengths(name: str, n: int, max_context: int = 2048,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths) of ``n`` requests like dataset ``name``'s."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if n < 1 or max_context < 2:
        raise ValueError("need n >= 1 and max_context >= 2")
    med_in, med_out = calibrated_medians(name, max_context)
    rng = np.random.default_rng(seed)
    return _clipped(DATASETS[name], _normal_strata(n, rng), _normal_strata(n, rng), med_in,
                    med_out, max_context)


@dataclasses.dataclass
class Workload:
    """Requests as token ids: the same list goes to every framework."""

    name: str
    prompts: list[list[int]]
    max_tokens: list[int]
    prompt_spec: str   # a loadgen length spec describing the draw (before clipping)
    output_spec: str

    def head(self, n: int) -> Workload:
        return dataclasses.replace(self, prompts=self.prompts[:n], max_tokens=self.max_tokens[:n])

    @property
    def max_context(self) -> int:
        return max(len(p) + m for p, m in zip(self.prompts, self.max_tokens, strict=True))

    def describe(self) -> dict:
        p = np.array([len(x) for x in self.prompts])
        o = np.array(self.max_tokens)
        return {"workload": self.name, "num_requests": len(p),
                "prompt_mean": float(p.mean()), "prompt_p50": float(np.median(p)),
                "prompt_max": int(p.max()), "output_mean": float(o.mean()),
                "output_p50": float(np.median(o)), "output_max": int(o.max()),
                "workload_max_context": self.max_context,
                "length_source": DATASETS[self.name].source if self.name in DATASETS
                else "uniform prompts, fixed output"}


def make_workload(name: str, n: int, max_context: int, vocab: int, bos: int = 2,
                  seed: int = 0, uniform_prompt: tuple[int, int] = (32, 512),
                  uniform_output: int = 128) -> Workload:
    """``n`` requests of workload ``name`` (``uniform``, ``sharegpt``, ``alpaca``): random
    prompt ids in [4, min(vocab, 50000)) after ``bos``."""
    rng = np.random.default_rng([seed, WORKLOADS.index(name) if name in WORKLOADS else 99])
    if name == "uniform":
        lo, hi = uniform_prompt
        out = min(uniform_output, max_context - 1)
        p = np.minimum(rng.integers(lo, hi + 1, n), max_context - out)
        o = np.full(n, out)
        spec = (f"uniform:{lo}:{hi}", str(out))
    elif name in DATASETS:
        p, o = synthesize_lengths(name, n, max_context, seed)
        s = DATASETS[name]
        med_in, med_out = calibrated_medians(name, max_context)
        spec = (f"lognormal:{med_in:.4g}:{s.input_sigma:g}",
                f"lognormal:{med_out:.4g}:{s.output_sigma:g}")
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    top = max(5, min(vocab, 50000))
    prompts = [[bos] + rng.integers(4, top, int(k) - 1).tolist() for k in p]
    return Workload(name, prompts, [int(x) for x in o], *spec)


# ---------------------------------------------------------------------------------------------
# Client-side measurement (the same for both frameworks)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Record:
    """One request as its caller sees it: submit time, (time, tokens so far) per delivery."""

    index: int
    prompt: list[int]
    max_tokens: int
    send_at: float = 0.0
    t_submit: float | None = None
    events: list = dataclasses.field(default_factory=list)
    t_done: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    handle: Any = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def deliver(self, t: float, total: int) -> None:
        if not self.events or total > self.events[-1][1]:
            self.events.append((t, total))

    def finish(self, t: float, reason: str, error: str | None = None) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.t_done, self.finish_reason, self.error = t, reason, error
            self.done.set()

    def result(self, t0: float) -> dict:
        """The request as one of loadgen's per-request dicts."""
        ev = self.events
        n = ev[-1][1] if ev else 0
        itl, prev = [], None
        for t, k in ev:
            if prev is not None:
                itl.extend([(t - prev[0]) / (k - prev[1])] * (k - prev[1]))
            prev = (t, k)
        error = self.error
        if error is None and self.finish_reason not in ("length", "stop"):
            error = f"finished with {self.finish_reason!r}"
        if error is None and not ev:
            error = "no tokens"
        return {"index": self.index, "send_at": self.send_at, "prompt_len": len(self.prompt),
                "max_tokens": self.max_tokens,
                "start_s": None if self.t_submit is None else self.t_submit - t0,
                "ttft_s": ev[0][0] - self.t_submit if ev else None,
                "e2e_s": None if self.t_done is None or error else self.t_done - self.t_submit,
                "tpot_s": (ev[-1][0] - ev[0][0]) / (n - 1) if n > 1 else None,
                "output_tokens": n, "prompt_tokens": len(self.prompt), "chunks": len(ev),
                "itl_s": itl, "finish_reason": self.finish_reason, "error": error}


def records_for(workload: Workload, send_at=None) -> list[Record]:
    times = np.zeros(len(workload.prompts)) if send_at is None else send_at
    return [Record(i, p, m, float(t)) for i, (p, m, t) in
            enumerate(zip(workload.prompts, workload.max_tokens, times, strict=True))]


class OptkitClient:
    """Requests into optkit's :class:`~optkit.serve.scheduler.Scheduler` (EOS ignored)."""

    framework = "optkit"

    def __init__(self, scheduler, config: dict | None = None):
        self.scheduler = scheduler
        self.config = config or {}
        self.warmed: set[str] = set()

    def submit(self, rec: Record) -> None:
        from optkit.serve.scheduler import SeqRequest

        req = SeqRequest(tuple(rec.prompt), rec.max_tokens, ignore_eos=True)
        rec.t_submit = time.perf_counter()
        (rec.handle,) = self.scheduler.submit([req], on_output=functools.partial(
            self._on_output, rec))

    @staticmethod
    def _on_output(rec: Record, handle, out) -> None:  # engine thread
        now = time.perf_counter()
        if out.num_generated:
            rec.deliver(now, out.num_generated)
        if out.finish_reason is not None:
            rec.finish(now, out.finish_reason, out.error)

    def cancel(self, rec: Record) -> None:
        if rec.handle is not None:
            rec.handle.cancel()

    def chunk_tokens(self, default: int) -> int:
        """The engine's prefill token budget per step where it has one, else ``default``."""
        for obj in (getattr(self.scheduler, "engine", None), self.scheduler):
            value = getattr(obj, "max_batched_tokens", None)
            if isinstance(value, int) and value > 0:
                return value
        return default

    def close(self) -> None:
        self.scheduler.stop()
        self.scheduler = None


class HFClient:
    """Requests into a transformers ``ContinuousBatchingManager`` (``add_request`` with each
    request's ``max_new_tokens``, EOS disabled, per-token timestamps)."""

    framework = "hf"

    def __init__(self, manager, config: dict | None = None):
        self.manager = manager
        self.config = config or {}
        self.warmed: set[str] = set()
        self._ids = itertools.count()
        self._pending: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, name="hf-results", daemon=True)
        self._thread.start()

    def submit(self, rec: Record) -> None:
        rid = f"r{next(self._ids)}"
        rec.handle = rid
        with self._lock:
            self._pending[rid] = rec
        rec.t_submit = time.perf_counter()
        rid = self.manager.add_request(list(rec.prompt), request_id=rid,
                                       max_new_tokens=rec.max_tokens, record_timestamps=True,
                                       eos_token_id=-1)
        if rid is None:  # the manager refused it (it logs why)
            with self._lock:
                self._pending.pop(rec.handle, None)
            rec.finish(time.perf_counter(), "error", "the HF manager dropped the request")

    def _collect(self) -> None:
        while not self._stop.is_set():
            out = self.manager.get_result(timeout=0.05)
            if out is None:
                if not self.manager.is_running():
                    self._fail_pending("the HF generation thread is not running")
                    time.sleep(0.05)
                continue
            if not out.is_finished():
                continue
            with self._lock:
                rec = self._pending.pop(out.request_id, None)
            if rec is None:
                continue
            stamps = list(out.timestamps or [])
            for k, t in enumerate(stamps):
                rec.deliver(t, k + 1)
            end = stamps[-1] if stamps else time.perf_counter()
            rec.finish(end, "length" if out.error is None else "error",
                       None if out.error is None else str(out.error))

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            recs, self._pending = list(self._pending.values()), {}
        for rec in recs:
            rec.finish(time.perf_counter(), "error", why)

    def cancel(self, rec: Record) -> None:
        if rec.handle is not None:
            self.manager.cancel_request(rec.handle)

    def chunk_tokens(self, default: int) -> int:
        cb = getattr(self.manager, "continuous_batching_config", None)
        return int(getattr(cb, "max_batch_tokens", None) or default)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.manager.stop(block=True, timeout=30)
        if hasattr(self.manager, "destroy"):
            self.manager.destroy()
        self.manager = None


def run_trace(client, records: list[Record], drain_s: float) -> tuple[float, float, bool]:
    """Submit each record at its ``send_at`` (s after the start) from this thread, wait up to
    ``drain_s`` after the last arrival; cancel what is left.  Returns (start time, duration
    to the last finish, whether every request finished in time)."""
    t0 = time.perf_counter()
    for rec in sorted(records, key=lambda r: r.send_at):
        delay = t0 + rec.send_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            client.submit(rec)
        except Exception as e:  # a refused request is a failed request, not a failed run
            rec.finish(time.perf_counter(), "error", f"{type(e).__name__}: {e}")
    end_by = time.perf_counter() + drain_s
    for rec in records:
        rec.done.wait(max(0.0, end_by - time.perf_counter()))
    late = [r for r in records if not r.done.is_set()]
    for rec in late:
        client.cancel(rec)
        rec.finish(time.perf_counter(), "error", f"unfinished {drain_s:g} s after the last "
                                                  "arrival")
    done = [r.t_done for r in records if r.error is None and r.t_done is not None]
    end = max(done) if done else time.perf_counter()
    return t0, end - t0, not late


def decode_batch(records: list[Record]) -> dict:
    """The largest number of requests between their first and last token at one time, and
    the time-average of that number over the decoding span."""
    spans = [(r.events[0][0], r.events[-1][0]) for r in records if r.events]
    if not spans:
        return {"batch_reached": 0, "mean_decode_batch": 0.0}
    marks = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans],
                   key=lambda x: (x[0], -x[1]))
    live = peak = 0
    for _, d in marks:
        live += d
        peak = max(peak, live)
    width = max(b for _, b in spans) - min(a for a, _ in spans)
    busy = sum(b - a for a, b in spans)
    return {"batch_reached": peak, "mean_decode_batch": busy / width if width > 0 else 1.0}


def summarize_run(records: list[Record], t0: float, duration: float, workload: Workload,
                  framework: str, model: str, rate: float | None, args) -> dict:
    """loadgen's summary row of one run, plus lengths and batch statistics."""
    from optkit.bench.loadgen import LoadConfig, summarize

    cfg = LoadConfig(url=f"in-process://{framework}", model=model,
                     num_requests=len(records), rate=math.inf if rate is None else rate,
                     prompt_len=workload.prompt_spec, output_len=workload.output_spec,
                     slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                     seed=args.seed, label=f"{framework} {workload.name}")
    results = [r.result(t0) for r in records]
    row = summarize(results, duration, cfg, model)
    row["rate"] = rate
    row["mismatched_outputs"] = sum(r["output_tokens"] != r["max_tokens"] for r in results
                                    if not r["error"])
    row.update(workload.describe())
    row.update(decode_batch([r for r in records if r.error is None]))
    row["generated_tokens"] = sum(r["output_tokens"] or 0 for r in results if not r["error"])
    return row


# ---------------------------------------------------------------------------------------------
# optkit: the engine, the scheduler, the same run's ceilings
# ---------------------------------------------------------------------------------------------
def build_engine(model, max_context: int, options: dict):
    """The engine ``Scheduler`` drives, as ``optkit serve`` builds it:
    ``optkit.serve.engine.make_engine`` (the paged engine on one device or a mesh) for
    sequences of up to ``max_context`` tokens at its default sizes; ``--engine-opt
    KEY=VALUE`` overrides any keyword argument (``max_num_seqs``, ``max_batched_tokens``,
    ``block_size``, ``num_blocks``, ``memory_fraction``)."""
    from optkit.serve.engine import make_engine

    return make_engine(model.executor, **{"max_len": max_context, **options})


def build_scheduler(engine, options: dict):
    from optkit import get_tokenizer
    from optkit.serve.scheduler import Limits, Scheduler
    from optkit.serve.text import HFCodec

    scheduler = Scheduler(engine, HFCodec(get_tokenizer()), Limits(max_queue=1_000_000),
                          **options)
    if hasattr(engine, "warmup"):  # what optkit serve does before it answers
        engine.warmup(steps=(1, scheduler.steps_per_dispatch))
    return scheduler.start()


def engine_config(engine) -> dict:
    """The engine's public sizes, for the rows."""
    keys = ("max_slots", "max_len", "max_num_seqs", "max_batched_tokens", "block_size",
            "num_blocks")
    out = {k: getattr(engine, k) for k in keys if isinstance(getattr(engine, k, None), int)}
    out["engine"] = type(engine).__name__
    return out


def matmul_tflops(n: int, dtype) -> float:
    """TFLOP/s of an ``n x n x n`` product (median of 10 after a warm-up)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e12


def generate_step_s(model, batch: int, context: int, steps: int, seed: int = 0) -> dict:
    """Seconds per decode step of the public ``model.generate()`` for ``batch`` rows around
    ``context`` tokens (greedy, ``steps`` new tokens; the second of two calls)."""
    cfg = model.config
    prompt = int(max(1, min(context - steps // 2, cfg.max_position_embeddings - steps)))
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, min(cfg.vocab_size, 50000), (batch, prompt)).astype(np.int32)
    ids[:, 0] = cfg.bos_token_id
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
              return_dict_in_generate=True)
    model.generate(ids, **kw)
    t = model.generate(ids, **kw).timings
    return {"step_s": t["decode_s"] / t["decode_steps"], "step_batch": batch,
            "step_prompt": prompt, "step_new_tokens": steps}


def prompt_flops(cfg, prompts) -> float:
    """Matmul FLOPs of prefilling each prompt alone and producing its first token."""
    from optkit.bench.textgen import generation_flops

    return float(sum(generation_flops(cfg, 1, len(p), 1) for p in prompts))


def ideal_row(cfg, offline: dict, workload: Workload, tflops: float, step: dict) -> dict:
    """The ideal schedule's time for the offline run ``offline`` (see the module doc)."""
    b = max(1, int(offline["batch_reached"]))
    flops = prompt_flops(cfg, workload.prompts)
    steps = max(math.ceil(sum(m - 1 for m in workload.max_tokens) / b),
                max(workload.max_tokens) - 1)
    prefill_s = flops / (tflops * 1e12)
    decode_s = steps * step["step_s"]
    ideal_s = prefill_s + decode_s
    tokens = sum(workload.max_tokens)
    return {"kind": "ideal", "workload": workload.name, "batch": b,
            "prompt_tflop": flops / 1e12, "matmul_tflops": tflops,
            "prefill_ideal_s": prefill_s, "decode_steps_ideal": steps,
            "step_ms": step["step_s"] * 1e3, **{k: v for k, v in step.items() if k != "step_s"},
            "decode_ideal_s": decode_s, "ideal_s": ideal_s, "ideal_tokens_per_s": tokens / ideal_s,
            "measured_s": offline["duration_s"], "offline_complete": offline["complete"],
            "measured_tokens_per_s": offline["output_token_throughput"],
            "fraction_of_ideal": ideal_s / offline["duration_s"]}


# ---------------------------------------------------------------------------------------------
# The parts: offline, online, stall (framework-agnostic through the clients)
# ---------------------------------------------------------------------------------------------
def warmup_subset(workload: Workload, count: int, max_tokens: int = 0) -> Workload:
    """``count`` requests spread over the prompt lengths (shortest and longest included)
    plus the longest context and the longest output: the shapes a run will meet; outputs
    cut to ``max_tokens`` where it is positive."""
    n = len(workload.prompts)
    if count and count < n:
        lens = np.array([len(p) for p in workload.prompts])
        order = np.argsort(lens, kind="stable")
        pick = set(order[np.linspace(0, n - 1, count).round().astype(int)].tolist())
        pick.add(int(np.argmax(lens + np.array(workload.max_tokens))))
        pick.add(int(np.argmax(workload.max_tokens)))
        idx = sorted(pick)
    elif max_tokens <= 0:
        return workload
    else:
        idx = list(range(n))
    cap = max_tokens if max_tokens > 0 else max(workload.max_tokens)
    return dataclasses.replace(workload, prompts=[workload.prompts[i] for i in idx],
                               max_tokens=[min(workload.max_tokens[i], cap) for i in idx])


def warm(client, workload: Workload, count: int, max_tokens: int, drain_s: float) -> float:
    """Run :func:`warmup_subset` of the workload once, all at once; its wall time."""
    w = warmup_subset(workload, count, max_tokens)
    t = time.perf_counter()
    run_trace(client, records_for(w), drain_s)
    return time.perf_counter() - t


def offline(client, workload: Workload, model: str, args, drain_s: float) -> tuple[dict, list]:
    records = records_for(workload)
    t0, duration, complete = run_trace(client, records, drain_s)
    row = summarize_run(records, t0, duration, workload, client.framework, model, None, args)
    row.update(kind="offline", complete=complete)
    return row, records


def online_requests(rate: float, args) -> int:
    return int(min(args.num_requests, max(args.online_min_requests,
                                          math.ceil(rate * args.online_seconds))))


def online_sweep(client, workload: Workload, model: str, args, budget, emit) -> list[dict]:
    """Poisson arrivals at each rate (ascending) until the framework falls behind."""
    from optkit.bench.loadgen import arrival_times

    rows = []
    rates = sorted(args.rates)
    for i, rate in enumerate(rates):
        if budget.left() < 10:
            emit({"kind": "skipped", "part": "online", "workload": workload.name,
                  "rates": rates[i:], "reason": "time budget spent"})
            break
        w = workload.head(online_requests(rate, args))
        times = arrival_times(len(w.prompts), rate, 1.0, np.random.default_rng(args.seed + 1))
        records = records_for(w, times)
        t0, duration, complete = run_trace(client, records, min(args.drain_s, budget.left()))
        row = summarize_run(records, t0, duration, w, client.framework, model, rate, args)
        row.update(kind="online", complete=complete)
        emit(row)
        rows.append(row)
        p99 = row.get("ttft_p99_ms")
        behind = not complete or p99 is None or p99 > args.stop_ttft_s * 1e3
        if behind and i + 1 < len(rates):
            emit({"kind": "skipped", "part": "online", "workload": workload.name,
                  "rates": rates[i + 1:],
                  "reason": f"fell behind at {rate:g} req/s (complete={complete}, "
                            f"p99 TTFT {p99} ms)"})
            break
    return rows


def slo_capacity(rows: list[dict], args) -> dict:
    """The highest rate whose p99 TTFT and p99 TPOT are within the SLOs."""
    ok = [r for r in rows if r["complete"] and r["failed"] == 0
          and r["ttft_p99_ms"] is not None and r["ttft_p99_ms"] <= args.slo_ttft_ms
          and (r["tpot_p99_ms"] is None or r["tpot_p99_ms"] <= args.slo_tpot_ms)]
    best = max(ok, key=lambda r: r["rate"]) if ok else None
    return {"kind": "slo_capacity", "workload": rows[0]["workload"] if rows else None,
            "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
            "rates_tested": [r["rate"] for r in rows],
            "max_rate_within_slo": best["rate"] if best else None,
            "ttft_p99_ms_at_max": best["ttft_p99_ms"] if best else None,
            "tpot_p99_ms_at_max": best["tpot_p99_ms"] if best else None,
            "output_token_throughput_at_max": best["output_token_throughput"] if best else None}


def _lone_ttft(client, prompt: list[int], drain_s: float) -> float | None:
    rec = Record(0, prompt, 1)
    run_trace(client, [rec], drain_s)
    return rec.events[0][0] - rec.t_submit if rec.events and rec.error is None else None


def stall_lengths(cfg, args) -> tuple[int, int]:
    """(long prompt tokens, stream tokens) of the stall test within the context."""
    ctx = min(args.max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return (min(args.stall_long or ctx - 8, ctx - 8),
            max(1, min(args.stall_stream_tokens, ctx - STREAM_PROMPT)))


def stall_workload(cfg, args) -> Workload:
    """The stall test's two requests (what engines are sized for)."""
    long_len, stream_tokens = stall_lengths(cfg, args)
    return Workload("stall", [[cfg.bos_token_id] * STREAM_PROMPT, [cfg.bos_token_id] * long_len],
                    [stream_tokens, 8], str(STREAM_PROMPT), str(stream_tokens))


STREAM_PROMPT = 64


def stall(client, cfg, args, drain_s: float) -> dict:
    """A long prompt arriving while one stream decodes (see the module doc)."""
    rng = np.random.default_rng(args.seed + 7)
    top = min(cfg.vocab_size, 50000)
    ctx = min(args.max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    long_len, stream_tokens = stall_lengths(cfg, args)

    def ids(n):
        return [cfg.bos_token_id] + rng.integers(4, top, n - 1).tolist()

    for _ in range(2):  # the first run compiles / captures the long prompt's shapes
        s = Record(0, ids(STREAM_PROMPT), stream_tokens)
        lng = Record(1, ids(long_len), 8)
        t0 = time.perf_counter()
        client.submit(s)
        time.sleep(args.stall_delay)
        run_trace(client, [lng], drain_s)
        s.done.wait(drain_s)
        if not s.done.is_set():
            client.cancel(s)
            s.finish(time.perf_counter(), "error", "the stream did not finish")
    chunk = client.chunk_tokens(args.chunk_tokens)
    chunk_ttft = [_lone_ttft(client, ids(min(chunk, ctx - 1)), drain_s) for _ in range(3)][1:]
    long_ttft = [_lone_ttft(client, ids(long_len), drain_s) for _ in range(2)][1:]
    row = {"kind": "stall", "long_prompt": long_len, "stream_tokens": stream_tokens,
           "stream_prompt": STREAM_PROMPT, "delay_s": args.stall_delay, "chunk_tokens": chunk,
           "stream_error": s.error, "long_error": lng.error,
           "chunk_prefill_ms": _median_ms(chunk_ttft), "long_prefill_alone_ms":
           _median_ms(long_ttft), "long_ttft_ms": None if not lng.events else
           (lng.events[0][0] - lng.t_submit) * 1e3}
    ev = s.events
    if len(ev) < 3 or s.error or lng.t_submit is None:
        return row
    gaps = [(ev[i][0] - ev[i - 1][0], ev[i][1] - ev[i - 1][1], ev[i][0])
            for i in range(1, len(ev))]
    end = lng.t_done or ev[-1][0]
    after = [g for g, _, t in gaps if t >= lng.t_submit and t - g <= end]
    per_token = [g / k for g, k, _ in gaps for _ in range(k)]
    med = statistics.median(g for g, _, _ in gaps)
    row.update(overlapped=ev[0][0] < lng.t_submit < ev[-1][0],
               stream_deliveries=len(ev), stream_start_s=t0,
               stream_median_gap_ms=med * 1e3,
               stream_median_token_gap_ms=statistics.median(per_token) * 1e3,
               stream_max_gap_ms=max(g for g, _, _ in gaps) * 1e3,
               stall_gap_ms=max(after) * 1e3 if after else None)
    if after:
        row["added_ms"] = (max(after) - med) * 1e3
        if row["chunk_prefill_ms"]:
            row["added_over_chunk_prefill"] = row["added_ms"] / row["chunk_prefill_ms"]
    return row


def _median_ms(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) * 1e3 if xs else None


# ---------------------------------------------------------------------------------------------
# Workers: one framework and one model each
# ---------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def versions() -> dict:
    out = {"python": platform.python_version(), "host": platform.node()}
    for name in ("jax", "jaxlib", "torch", "transformers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    import optkit

    out["optkit"] = optkit.__version__
    return out


def parse_options(items) -> dict:
    """``KEY=VALUE`` strings -> keyword arguments (values read as JSON when they parse)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"options are KEY=VALUE with a Python name as KEY; got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def workloads_for(cfg, args) -> dict[str, Workload]:
    ctx = min(args.max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    names = dict.fromkeys([*(args.workloads if "offline" in args.parts else []),
                           *([args.online_workload] if "online" in args.parts else [])])
    return {n: make_workload(n, args.num_requests, ctx, cfg.vocab_size, cfg.bos_token_id,
                             args.seed, tuple(args.uniform_prompt), args.uniform_output)
            for n in names}


class Writer:
    """Appends rows (with the run's common fields) to the JSONL file as they come."""

    def __init__(self, path: Path, common: dict):
        self.path, self.common = path, common

    def __call__(self, row: dict) -> dict:
        from optkit.bench.results import append_rows

        full = {**self.common, **row,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())}
        append_rows([full], self.path)
        print(json.dumps(brief(full), default=str), flush=True)
        return full


def brief(row: dict) -> dict:
    keys = ("kind", "framework", "model", "workload", "rate", "output_token_throughput",
            "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "batch_reached",
            "warmup_s", "fraction_of_ideal", "max_rate_within_slo", "stall_gap_ms",
            "stream_median_gap_ms", "chunk_prefill_ms", "added_over_chunk_prefill", "failed",
            "error", "reason")
    return {k: row[k] for k in keys if row.get(k) is not None}


def run_parts(make_client, cfg, model_name: str, works: dict[str, Workload], args, emit,
              budget: Budget, on_offline=None) -> None:
    """Offline, stall and online parts (in that order) through clients from ``make_client(w)``
    (``(client, setup_s)``; ``setup_s`` None when a client built earlier comes back).
    A failing part becomes an error row; the others still run."""
    def ready(w: Workload):
        client, setup_s = make_client(w)
        warm_s = None
        if w.name not in client.warmed:
            warm_s = warm(client, w, args.warmup_requests, args.warmup_max_tokens,
                          max(60.0, budget.left()))
            client.warmed.add(w.name)
        return client, setup_s, warm_s

    jobs = [("offline", n) for n in args.workloads if "offline" in args.parts]
    if "stall" in args.parts:
        jobs.append(("stall", None))
    if "online" in args.parts:  # last: it runs until the framework falls behind
        jobs.append(("online", args.online_workload))
    for part, name in jobs:
        if budget.left() < 10:
            emit({"kind": "skipped", "part": part, "workload": name,
                  "reason": "time budget spent"})
            continue
        try:
            if part == "offline":
                client, setup_s, warm_s = ready(works[name])
                row, records = offline(client, works[name], model_name, args,
                                       max(60.0, budget.left()))
                row = emit({**row, "setup_s": setup_s, "warmup_s": warm_s,
                            **client_config(client)})
                if on_offline is not None:
                    on_offline(row, works[name])
            elif part == "online":
                client, setup_s, warm_s = ready(works[name])
                rows = online_sweep(client, works[name], model_name, args, budget,
                                    lambda r, c=client, s=setup_s, w=warm_s: emit(
                                        {**r, "setup_s": s, "warmup_s": w, **client_config(c)}))
                emit(slo_capacity(rows, args))
            else:
                client, setup_s = make_client(stall_workload(cfg, args))
                emit({**stall(client, cfg, args, max(60.0, min(args.drain_s, budget.left()))),
                      "setup_s": setup_s, **client_config(client)})
        except Exception as e:
            import traceback

            traceback.print_exc()
            emit({"kind": "error", "part": part, "workload": name,
                  "error": f"{type(e).__name__}: {e}"})


def client_config(client) -> dict:
    return client.config


def optkit_worker(args, model_name: str, emit) -> None:
    import jax

    from optkit import get_model

    try:
        from optkit.serve.scheduler import Scheduler  # noqa: F401  (FastAPI etc. present?)
    except ImportError as e:
        emit({"kind": "error", "part": "import", "error": f"optkit.serve cannot be imported "
              f"({e}): carry the wheels of fastapi, starlette, pydantic, pydantic-core, "
              "uvicorn, annotated-types and typing-inspection"})
        return
    budget = Budget(args.budget_s)
    t = time.perf_counter()
    model = get_model(f"jax/{model_name}", dummy=True, dtype=args.dtype, progress=False)
    jax.block_until_ready(getattr(model.executor, "params", None))
    init_s = time.perf_counter() - t
    cfg = model.config
    size = args.matmul_size or (8192 if jax.devices()[0].platform == "gpu" else 512)
    tflops = matmul_tflops(size, model.dtype)
    emit({"kind": "ceiling", "init_s": init_s, "matmul_size": size, "matmul_tflops": tflops,
          "dtype": str(np.dtype(model.dtype))})
    engine_opts, sched_opts = parse_options(args.engine_opt), parse_options(args.scheduler_opt)
    # one engine for every part, sized for the run's context (as optkit serve builds one)
    ctx = min(args.max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    state: dict = {"client": None}
    offline_rows: list[tuple[dict, Workload]] = []

    def make_client(w: Workload):
        if state["client"] is not None:
            return state["client"], None
        t = time.perf_counter()
        engine = build_engine(model, ctx, engine_opts)
        client = OptkitClient(build_scheduler(engine, sched_opts), {
            "engine_config": engine_config(engine), "engine_options": engine_opts,
            "scheduler_options": sched_opts})
        state.update(client=client)
        return client, time.perf_counter() - t

    def ideal(row: dict, w: Workload) -> None:
        """After every part, the engine freed (generate() needs the memory): time a decode
        step at the batch the offline run reached, emit the ideal bound."""
        try:
            context = int(round(np.mean([len(p) for p in w.prompts]) + np.mean(w.max_tokens) / 2))
            step = generate_step_s(model, max(1, int(row["batch_reached"])), context,
                                   args.step_tokens, args.seed)
            emit(ideal_row(cfg, row, w, tflops, step))
        except Exception as e:
            emit({"kind": "error", "part": "ideal", "workload": w.name,
                  "error": f"{type(e).__name__}: {e}"})

    run_parts(make_client, cfg, model_name, workloads_for(cfg, args), args, emit, budget,
              on_offline=lambda row, w: offline_rows.append((row, w)))
    if state["client"] is not None:
        state["client"].close()
        state["client"] = None
        gc.collect()
    for row, w in offline_rows:
        ideal(row, w)


def hf_model(model_name: str, dtype: str):
    """transformers' ``OPTForCausalLM`` with random weights of optkit's config, created on
    the GPU (or CPU) in ``dtype``."""
    import torch
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    from optkit.config import OPTConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    tdtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        with torch.device(device):
            model = OPTForCausalLM(HFConfig(**OPTConfig.from_name(model_name).to_hf_dict()))
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), device, dtype


def hf_worker(args, model_name: str, emit) -> None:
    """HF transformers' continuous batching; any failure becomes an error row."""
    from optkit.config import OPTConfig

    budget = Budget(args.budget_s)
    cfg = OPTConfig.from_name(model_name)
    try:
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        t = time.perf_counter()
        model, device, dtype = hf_model(model_name, args.dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        emit({"kind": "ceiling", "init_s": time.perf_counter() - t, "dtype": dtype,
              "card": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"})
    except Exception as e:
        emit({"kind": "error", "part": "init", "error": f"{type(e).__name__}: {e}"})
        return
    hf_opts = parse_options(args.hf_opt)
    state: dict = {"client": None, "key": None}

    def make_client(w: Workload):
        from transformers.generation.continuous_batching.utils import WorkloadHints

        key = (w.name, len(w.prompts))
        if state["client"] is not None and state["key"] == key:
            return state["client"], None
        if state["client"] is not None:
            state["client"].close()
            state["client"] = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        t = time.perf_counter()
        gen = GenerationConfig(max_new_tokens=max(w.max_tokens), do_sample=False,
                               eos_token_id=-1, pad_token_id=cfg.pad_token_id)
        hints = WorkloadHints(max_prompt_length=max(len(p) for p in w.prompts),
                              max_generated_length=max(w.max_tokens),
                              num_requests=max(len(w.prompts), 2))
        manager = model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**hf_opts),
            workload_hints=hints)
        manager.warmup()
        manager.start()
        resolved = getattr(manager, "continuous_batching_config", None)
        client = HFClient(manager, {"hf_options": hf_opts, "hf_config": {
            k: v for k, v in (vars(resolved) if resolved is not None else {}).items()
            if isinstance(v, int | float | bool | str | tuple | type(None))},
            "attn_implementation": getattr(model.config, "_attn_implementation", None)})
        state.update(client=client, key=key)
        return client, time.perf_counter() - t

    run_parts(make_client, cfg, model_name, workloads_for(cfg, args), args, emit, budget)
    if state["client"] is not None:
        state["client"].close()


# ---------------------------------------------------------------------------------------------
# Report: plots and a summary from the rows
# ---------------------------------------------------------------------------------------------
def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fmt(v, digits=0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, int | float) else str(v)


def _setup(row: dict) -> float | None:
    """Seconds before a framework served its first timed request: engine setup (optkit's
    includes its warm-up compiles) plus the warm-up requests."""
    parts = [row.get("setup_s"), row.get("warmup_s")]
    return None if all(p is None for p in parts) else sum(p or 0.0 for p in parts)


def summary_markdown(rows: list[dict]) -> str:
    """Tables of the offline, online and stall rows (optkit next to HF, the ideal bound)."""
    off = [r for r in rows if r.get("kind") == "offline"]
    ideal = {(r["model"], r["workload"]): r for r in rows if r.get("kind") == "ideal"}
    first = rows[0] if rows else {}
    cards = sorted({str(r.get("card")) for r in rows if r.get("card")})
    lines = ["# Serving benchmark (benchmarks/serve_gpu.py)", "",
             f"Card: {', '.join(cards) or '-'}; jax {first.get('jax')}, torch "
             f"{first.get('torch')}, transformers {first.get('transformers')}, python "
             f"{first.get('python')}. Random weights ("
             + ", ".join(sorted({str(r["dtype"]) for r in rows if r.get("dtype")}))
             + "), greedy, EOS ignored.", "",
             "## Offline (all requests at once)", "",
             "| model | workload | framework | requests | gen tok/s | TTFT p50 / p99 (ms) | "
             "TPOT p50 / p99 (ms) | batch reached | setup + warm-up (s) | ideal tok/s | "
             "of ideal | optkit / HF |", "|" + "---|" * 12]
    hf = {(r["model"], r["workload"]): r for r in off if r.get("framework") == "hf"}
    for r in off:
        key = (r["model"], r["workload"])
        i = ideal.get(key)
        ratio = "-"
        if r.get("framework") == "optkit" and key in hf and hf[key]["output_token_throughput"]:
            ratio = _fmt(r["output_token_throughput"] / hf[key]["output_token_throughput"], 2)
        frac = (r["output_token_throughput"] / i["ideal_tokens_per_s"]) if i else None
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['framework']} | {r['completed']} | "
            f"{_fmt(r['output_token_throughput'])} | {_fmt(r['ttft_p50_ms'])} / "
            f"{_fmt(r['ttft_p99_ms'])} | {_fmt(r['tpot_p50_ms'], 1)} / {_fmt(r['tpot_p99_ms'], 1)}"
            f" | {r.get('batch_reached')} | {_fmt(_setup(r), 1)} | "
            f"{_fmt(i['ideal_tokens_per_s']) if i else '-'} | {_fmt(frac, 2)} | {ratio} |")
    cap = [r for r in rows if r.get("kind") == "slo_capacity"]
    if cap:
        lines += ["", "## Online (Poisson arrivals): highest rate within the SLOs", "",
                  "| model | workload | framework | SLO p99 TTFT / TPOT (ms) | rates tested | "
                  "max rate within SLO (req/s) | optkit / HF |", "|" + "---|" * 7]
        def capacity(r) -> tuple[float | None, bool]:
            """(the rate, whether it is only an upper bound: no rate tested was within)"""
            if r["max_rate_within_slo"] is None and r["rates_tested"]:
                return min(r["rates_tested"]), True
            return r["max_rate_within_slo"], False

        hf_cap = {(r["model"], r["workload"]): capacity(r) for r in cap
                  if r.get("framework") == "hf"}
        for r in cap:
            own, below = capacity(r)
            other, other_below = hf_cap.get((r["model"], r["workload"]), (None, False))
            ratio = "-"
            if r.get("framework") == "optkit" and own and other and not below:
                ratio = ("> " if other_below else "") + _fmt(own / other, 2)
            shown = (f"< {own:g} (none within)" if below else _fmt(own, 2))
            lines.append(f"| {r['model']} | {r['workload']} | {r['framework']} | "
                         f"{r['slo_ttft_ms']:g} / {r['slo_tpot_ms']:g} | "
                         f"{', '.join(f'{x:g}' for x in r['rates_tested'])} | "
                         f"{shown} | {ratio} |")
    onl = [r for r in rows if r.get("kind") == "online"]
    if onl:
        lines += ["", "| model | framework | rate | requests | gen tok/s | TTFT p50 / p99 (ms) | "
                  "TPOT p50 / p99 (ms) | failed |", "|" + "---|" * 8]
        for r in sorted(onl, key=lambda r: (r["model"], r["framework"], r["rate"])):
            lines.append(f"| {r['model']} | {r['framework']} | {r['rate']:g} | "
                         f"{r['num_requests']} | {_fmt(r['output_token_throughput'])} | "
                         f"{_fmt(r['ttft_p50_ms'])} / {_fmt(r['ttft_p99_ms'])} | "
                         f"{_fmt(r['tpot_p50_ms'], 1)} / {_fmt(r['tpot_p99_ms'], 1)} | "
                         f"{r['failed']} |")
    st = [r for r in rows if r.get("kind") == "stall"]
    if st:
        lines += ["", "## A long prompt arriving during a stream", "",
                  "| model | framework | long prompt | stall gap (ms) | median gap (ms) | "
                  "added (ms) | chunk tokens | chunk prefill (ms) | added / chunk | "
                  "long prefill alone (ms) |", "|" + "---|" * 10]
        for r in st:
            lines.append(f"| {r['model']} | {r['framework']} | {r['long_prompt']} | "
                         f"{_fmt(r.get('stall_gap_ms'), 1)} | "
                         f"{_fmt(r.get('stream_median_gap_ms'), 1)} | "
                         f"{_fmt(r.get('added_ms'), 1)} | {r['chunk_tokens']} | "
                         f"{_fmt(r.get('chunk_prefill_ms'), 1)} | "
                         f"{_fmt(r.get('added_over_chunk_prefill'), 2)} | "
                         f"{_fmt(r.get('long_prefill_alone_ms'), 1)} |")
    bad = [r for r in rows if r.get("kind") in ("error", "skipped")
           or r.get("kind") in ("offline", "online") and r.get("failed")]
    if bad:
        lines += ["", "## Errors, failed requests and skipped parts", ""]
        lines += [f"- {r.get('model')} {r.get('framework')} {r.get('part') or r.get('kind')} "
                  f"{r.get('workload') or ''}"
                  + (f" at {r['rate']:g} req/s" if r.get("rate") else "") + ": "
                  + (f"{r['failed']} of {r['num_requests']} requests failed, first: "
                     f"{r.get('first_error')}" if r.get("failed") else
                     str(r.get("error") or r.get("reason"))) for r in bad]
    return "\n".join(lines) + "\n"


def plot_rates(rows: list[dict], out_dir: Path) -> list[Path]:
    """throughput_vs_rate.png and latency_vs_rate.png (TTFT and TPOT p50 / p99) from the
    online rows, one column per model, a line per framework."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    from optkit.bench.plots import ReportFigure, save

    onl = [r for r in rows if r.get("kind") == "online"]
    if not onl:
        return []
    models = sorted({r["model"] for r in onl})
    rates = sorted({r["rate"] for r in onl})
    plain = FuncFormatter(lambda v, _: f"{v:g}")

    def rate_axis(ax):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.grid(alpha=0.3)
    out = []
    fig = ReportFigure(figsize=(5 * len(models), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(models)))
    for ax, m in zip(axes, models, strict=True):
        for fw in FRAMEWORKS:
            g = sorted((r for r in onl if r["model"] == m and r["framework"] == fw),
                       key=lambda r: r["rate"])
            if g:
                ax.plot([r["rate"] for r in g], [r["output_token_throughput"] for r in g], "o-",
                        label=fw)
        ax.set(title=m, xlabel="offered rate (req/s)", ylabel="generated tokens / s")
        rate_axis(ax)
        ax.legend(fontsize=8)
    save(fig, out_dir / "throughput_vs_rate.png")
    out.append(out_dir / "throughput_vs_rate.png")
    fig = ReportFigure(figsize=(5 * len(models), 7), layout="constrained")
    axes = np.array(fig.subplots(2, len(models))).reshape(2, len(models))
    for j, m in enumerate(models):
        for i, (metric, slo) in enumerate((("ttft", "slo_ttft_ms"), ("tpot", "slo_tpot_ms"))):
            ax = axes[i, j]
            for fw, color in zip(FRAMEWORKS, ("C0", "C1"), strict=True):
                g = sorted((r for r in onl if r["model"] == m and r["framework"] == fw),
                           key=lambda r: r["rate"])
                if not g:
                    continue
                x = [r["rate"] for r in g]
                ax.plot(x, [r[f"{metric}_p50_ms"] for r in g], "o-", color=color,
                        label=f"{fw} p50")
                ax.plot(x, [r[f"{metric}_p99_ms"] for r in g], "s--", color=color,
                        label=f"{fw} p99")
            limit = next((r.get(slo) for r in onl if r.get(slo)), None)
            if limit:
                ax.axhline(limit, color="k", lw=0.8, ls=":", label="SLO")
            ax.set(title=f"{m}: {metric.upper()}", xlabel="offered rate (req/s)", ylabel="ms",
                   yscale="log")
            rate_axis(ax)
            ax.legend(fontsize=7)
    save(fig, out_dir / "latency_vs_rate.png")
    out.append(out_dir / "latency_vs_rate.png")
    return out


def make_report(rows_path, out_dir=None) -> list[Path]:
    """summary.md and the rate plots next to (or in ``out_dir`` for) a rows file."""
    rows = _rows(rows_path)
    out_dir = Path(out_dir or Path(rows_path).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(summary_markdown(rows))
    return [out_dir / "summary.md", *plot_rates(rows, out_dir)]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
EPILOG = """\
workloads: uniform (prompts uniform in --uniform-prompt, --uniform-output new tokens);
  sharegpt / alpaca (lognormal lengths with the vLLM paper's means, Fig. 11: ShareGPT
  161.31 in / 337.99 out, Alpaca 19.31 in / 58.45 out; clipped to the context).
examples (one H200; each call a few minutes):
  python benchmarks/serve_gpu.py --models opt-6.7b --frameworks optkit
  python benchmarks/serve_gpu.py --models opt-6.7b --frameworks hf --rates 0.5 1 2 4
  python benchmarks/serve_gpu.py --models opt-tiny --in-process --num-requests 8  # CPU
  python benchmarks/serve_gpu.py --report build/serve_gpu/serve_gpu.jsonl
rows: --out/serve_gpu.jsonl (appended as measured); summary.md, throughput_vs_rate.png
and latency_vs_rate.png beside it."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="optkit's serving engine vs HF transformers continuous batching on one "
                    "GPU: offline throughput with the same run's ideal bound, Poisson rate "
                    "sweeps, and a long prompt arriving during a stream.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--models", nargs="+", default=["opt-6.7b", "opt-13b"],
      help="OPT sizes (random weights): opt-6.7b opt-13b ... (default: %(default)s)")
    a("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    a("--skip-hf", action="store_true", help="only optkit (same as --frameworks optkit)")
    a("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    a("--workloads", nargs="+", choices=WORKLOADS, default=["uniform"],
      help="offline workloads (default: %(default)s)")
    a("--online-workload", choices=WORKLOADS, default="sharegpt")
    a("--num-requests", type=int, default=256,
      help="requests per offline workload; most per online rate (default: %(default)s)")
    a("--uniform-prompt", type=int, nargs=2, default=(32, 512), metavar=("LO", "HI"))
    a("--uniform-output", type=int, default=128)
    a("--max-context", type=int, help="clip lengths to this (default: the model's context)")
    a("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16],
      help="online Poisson rates, req/s (default: %(default)s)")
    a("--online-seconds", type=float, default=10.0,
      help="arrival window per rate: rate x this many requests (default: %(default)s)")
    a("--online-min-requests", type=int, default=16)
    a("--drain-s", type=float, default=60.0,
      help="after the last arrival, wait this long before cancelling (default: %(default)s)")
    a("--stop-ttft-s", type=float, default=10.0,
      help="stop a framework's sweep after a rate with p99 TTFT above this")
    a("--slo-ttft-ms", type=float, default=1000.0)
    a("--slo-tpot-ms", type=float, default=50.0)
    a("--stall-long", type=int, help="long prompt tokens (default: context - 8)")
    a("--stall-stream-tokens", type=int, default=512)
    a("--stall-delay", type=float, default=1.0,
      help="seconds between the stream's and the long prompt's arrival")
    a("--chunk-tokens", type=int, default=512,
      help="optkit's prefill chunk (its token budget per step) for the stall row")
    a("--warmup-requests", type=int, default=64,
      help="warm-up requests spread over a workload's lengths, run once before it is timed "
           "(0: the whole workload; default: %(default)s)")
    a("--warmup-max-tokens", type=int, default=64,
      help="cut warm-up requests' outputs to this many tokens (0: as drawn): one long "
           "output at a slow framework's step time can take minutes (optkit's engine "
           "warm-up compiles every step shape on GPUs; default: %(default)s)")
    a("--step-tokens", type=int, default=64,
      help="new tokens of the generate() call timing a decode step (default: %(default)s)")
    a("--matmul-size", type=int, help="n of the n^3 matmul (default: 8192 on GPUs, else 512)")
    a("--engine-opt", action="append", metavar="KEY=VALUE",
      help="keyword argument of the engine's constructor (see build_engine); repeatable")
    a("--scheduler-opt", action="append", metavar="KEY=VALUE",
      help="keyword argument of Scheduler, e.g. steps_per_dispatch=8; repeatable")
    a("--hf-opt", action="append", metavar="KEY=VALUE",
      help="ContinuousBatchingConfig field, e.g. max_batch_tokens=512; repeatable")
    a("--dtype", default="auto", help="auto (fp16 on GPUs, fp32 on CPUs), float16, ...")
    a("--budget-s", type=float, default=270.0,
      help="seconds per (model, framework) before remaining parts are skipped")
    a("--seed", type=int, default=0)
    a("--out", default="build/serve_gpu", help="output folder (default: %(default)s)")
    a("--in-process", action="store_true",
      help="run every worker in this process (CPUs, tests) instead of a subprocess each")
    a("--report", metavar="ROWS", help="only write summary.md and plots from a rows file")
    a("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    a("--worker-model", help=argparse.SUPPRESS)
    return ap


def check_args(args) -> None:
    if args.skip_hf:
        args.frameworks = [f for f in args.frameworks if f != "hf"]
    if args.num_requests < 1 or args.online_min_requests < 1:
        raise SystemExit("--num-requests and --online-min-requests must be >= 1")
    if any(r <= 0 for r in args.rates):
        raise SystemExit("--rates must be positive")
    lo, hi = args.uniform_prompt
    if not 1 <= lo <= hi or args.uniform_output < 1:
        raise SystemExit("--uniform-prompt LO HI needs 1 <= LO <= HI; --uniform-output >= 1")
    from optkit.config import OPTConfig

    for m in args.models:
        try:
            OPTConfig.from_name(m)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    for opts in (args.engine_opt, args.scheduler_opt, args.hf_opt):
        try:
            parse_options(opts)
        except ValueError as e:
            raise SystemExit(str(e)) from None


def run_worker(args, framework: str, model_name: str, rows_path: Path) -> None:
    common = {"framework": framework, "model": model_name, **versions(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("worker", "worker_model", "report")}}
    if framework == "optkit":
        import jax

        common["card"] = jax.devices()[0].device_kind
        common["xla_python_client_mem_fraction"] = os.environ.get(
            "XLA_PYTHON_CLIENT_MEM_FRACTION")
        optkit_worker(args, model_name, Writer(rows_path, common))
    else:
        try:
            import torch

            common["card"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                              else "cpu")
        except Exception as e:  # recorded; the HF worker writes its own error row
            common["card"] = f"unknown ({type(e).__name__})"
        hf_worker(args, model_name, Writer(rows_path, common))


def spawn(args, framework: str, model_name: str, rows_path: Path, argv: list[str]) -> None:
    """One worker subprocess; its output is relayed; a crash becomes an error row."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if framework == "optkit":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    else:
        env["JAX_PLATFORMS"] = "cpu"  # the HF worker never puts JAX on the card
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", framework,
           "--worker-model", model_name]
    tail: deque[str] = deque(maxlen=30)
    t = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip())
        rc = proc.wait()
    if rc != 0:
        Writer(rows_path, {"framework": framework, "model": model_name, **versions()})(
            {"kind": "error", "part": "worker", "returncode": rc,
             "error": "\n".join(tail)[-3000:], "wall_s": time.perf_counter() - t})


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    out = Path(args.out)
    if args.report:
        for p in make_report(args.report, args.out if "--out" in argv else None):
            print(f"wrote {p}")
        return 0
    check_args(args)
    rows_path = out / ROWS
    if args.worker:
        run_worker(args, args.worker, args.worker_model, rows_path)
        return 0
    for model_name in args.models:
        for framework in args.frameworks:
            if args.in_process:
                try:
                    run_worker(args, framework, model_name, rows_path)
                except Exception as e:
                    import traceback

                    traceback.print_exc()
                    Writer(rows_path, {"framework": framework, "model": model_name,
                                       **versions()})({"kind": "error", "part": "worker",
                                                       "error": f"{type(e).__name__}: {e}"})
            else:
                spawn(args, framework, model_name, rows_path, argv)
    if rows_path.exists():
        for p in make_report(rows_path, out):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
