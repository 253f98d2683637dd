"""Where a device's time goes: kernel time by kind from a JAX profiler trace.

:func:`profile` runs a function under ``jax.profiler.trace`` and reads the kernels each
device ran back from the trace (:func:`kernel_events`, through ``jax.profiler.ProfileData``:
no TensorBoard needed); :func:`summarize` adds them up per step: busy and idle time of each
device, time by kind (:data:`KINDS`, a rule table on kernel and HLO op names) and the kernels
that took longest; :func:`around` lists the kernels around one of them.  On GPUs the kernels
are those on the CUDA stream lines (kernels inside a CUDA graph that holds a whole loop are
not traced one by one); on CPUs the XLA ops that the host threads ran.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from collections import defaultdict

#: (kind, pattern searched in "kernel name|HLO op"), first match wins; the rest is "fusion".
KINDS = (
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all"
                   r"|psum"),
    ("copy", r"memcpy|memset|copy-start|copy-done"),
    ("pallas", r"int8_matvec|int8_mma|decode_attention"),
    ("gemm", r"gemm|gemv|cutlass|xmma|nvjet|cublas|\bdot\b|dot\.|convolution"),
)


@dataclasses.dataclass(frozen=True)
class Event:
    """One kernel (GPU) or XLA op (CPU) run on one device."""

    device: str
    name: str
    op: str
    start_ns: float
    dur_ns: float


def kind(event: Event) -> str:
    """The first :data:`KINDS` rule matching the event's kernel name or HLO op."""
    text = f"{event.name}|{event.op}".lower()
    return next((k for k, pat in KINDS if re.search(pat, text)), "fusion")


def kernel_events(path: str) -> list[Event]:
    """Kernels in one ``.xplane.pb`` file: the events of each GPU plane's stream lines, or,
    without GPU planes, the host events that carry an ``hlo_op``."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    gpus = [p for p in data.planes if p.name.startswith("/device:GPU:")]
    out = []
    for plane in gpus:
        device = "gpu:" + plane.name.rsplit(":", 1)[1]
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for e in line.events:
                stats = dict(e.stats)
                out.append(Event(device, e.name, str(stats.get("hlo_op", "")), e.start_ns,
                                 e.duration_ns))
    if gpus:
        return out
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats:
                    device = f"cpu:{stats.get('device_ordinal', 0)}"
                    out.append(Event(device, e.name, str(stats["hlo_op"]), e.start_ns,
                                     e.duration_ns))
    return out


def _per_device(events: list[Event]) -> dict[str, list[Event]]:
    """Events by device, each device's in start order."""
    per = defaultdict(list)
    for e in sorted(events, key=lambda e: e.start_ns):
        per[e.device].append(e)
    return dict(sorted(per.items()))


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarize(events: list[Event], steps: int = 1, top: int = 12) -> dict:
    """Per device, in µs per step: ``span`` (first kernel start to last kernel end),
    ``busy`` (some kernel running), ``idle`` (span - busy), ``kernels`` (count per step),
    ``by_kind`` (summed kernel time; overlapping kernels count twice) and the ``top`` kernels
    by summed time with their kind, HLO op and count per step."""
    out = {}
    for device, evs in _per_device(events).items():
        spans = [(e.start_ns, e.start_ns + e.dur_ns) for e in evs]
        span = max(e for _, e in spans) - min(s for s, _ in spans)
        busy = _busy(spans)
        by_kind, by_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
        ops = {}
        for e in evs:
            by_kind[kind(e)] += e.dur_ns
            by_name[e.name] += e.dur_ns
            count[e.name] += 1
            ops.setdefault(e.name, e.op)
        names = sorted(by_name, key=by_name.get, reverse=True)[:top]
        out[device] = {
            "span_us": span / steps / 1e3, "busy_us": busy / steps / 1e3,
            "idle_us": (span - busy) / steps / 1e3, "kernels": len(evs) / steps,
            "by_kind_us": {k: v / steps / 1e3 for k, v in
                           sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:120], "kind": kind(Event(device, n, ops[n], 0, 0)),
                     "op": ops[n], "us": by_name[n] / steps / 1e3,
                     "count": count[n] / steps} for n in names],
        }
    return out


def profile(fn, *args, trace_dir: str | None = None):
    """``(fn(*args) made ready, its kernel events)`` from one traced call of ``fn``; the
    trace stays in ``trace_dir`` when one is given (else a temporary folder)."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        where = trace_dir or tmp
        with jax.profiler.trace(where):
            result = jax.block_until_ready(fn(*args))
        files = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True),
                       key=os.path.getmtime)
        if not files:
            raise RuntimeError(f"profile: jax.profiler.trace wrote no .xplane.pb under {where}")
        return result, kernel_events(files[-1])


def around(events: list[Event], pattern: str, before: int = 6, after: int = 3,
           nth: int | None = 0) -> dict:
    """Per device, the kernels just before and after the ``nth`` kernel (None: the middle
    one) whose name or op matches ``pattern``: ``[(name, op, start µs from that kernel's
    start, µs)]``, to see what a collective waits for (device clocks are the host's, so
    devices line up)."""
    out = {}
    for device, evs in _per_device(events).items():
        hits = [i for i, e in enumerate(evs) if re.search(pattern, f"{e.name}|{e.op}")]
        n = len(hits) // 2 if nth is None else nth
        if len(hits) <= n:
            continue
        i = hits[n]
        t0 = evs[i].start_ns
        out[device] = [(e.name[:60], e.op, (e.start_ns - t0) / 1e3, e.dur_ns / 1e3)
                       for e in evs[max(0, i - before):i + after + 1]]
    return out
