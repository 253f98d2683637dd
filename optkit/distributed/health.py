"""Faults, versions and weights across hosts: clear errors instead of hangs or silent skew.

* :class:`WorkerError` names the worker, host and process that died, hung or failed.
* :func:`wait_all` waits for one call on every worker, pinging the workers whose call is
  still running; a dead worker or an unanswered heartbeat becomes a :class:`WorkerError`
  within a bounded time (a JAX collective waiting for a dead peer may block forever, so the
  driver never waits on the survivors alone).
* :func:`local_versions` / :func:`check_versions`: Python, JAX, jaxlib, optkit (version and
  a digest of its source) must match the driver's on every host.
* :func:`weights_report` / :func:`check_weights`: the weight folder must be on every host (or
  a shared filesystem) with the same files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from optkit.version import __version__
from optkit.weights.folder import WeightError

#: Fields every worker must share with the driver (the SPMD program and the step functions
#: the driver sends must be the same code on every process).
CORE_VERSIONS = ("python", "jax", "jaxlib", "optkit", "optkit source")
#: Accelerator plugins: compared among the workers only (a CPU-only driver has none).
PLUGINS = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
           "libtpu")


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Where one JAX process runs."""

    rank: int
    host: str
    ip: str
    pid: int
    node_id: str = ""

    def __str__(self) -> str:
        return f"worker {self.rank} (host {self.host}, {self.ip}, pid {self.pid})"


class WorkerError(RuntimeError):
    """A worker process died, stopped answering or failed; the message says which."""

    def __init__(self, message: str, workers: Sequence[WorkerInfo] = ()):
        super().__init__(message)
        self.workers = tuple(workers)


class VersionMismatchError(WorkerError):
    """Hosts run different Python / JAX / optkit versions."""


# --------------------------------------------------------------------------------------------
# Waiting with heartbeats
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds.  ``heartbeat_interval``: how often a worker with a running call is pinged;
    ``heartbeat_timeout``: how long a ping may stay unanswered; ``call``: bound on one call
    (``None``: none, heartbeats still apply); ``grace``: how long the other workers may run on
    after one raised an exception before they count as stuck in a collective."""

    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 30.0
    call: float | None = None
    grace: float = 10.0


def wait_all(calls: Mapping[Any, WorkerInfo], ping: Callable[[WorkerInfo], Any],
             timeouts: Timeouts, what: str) -> dict[int, Any]:
    """Results by rank of ``calls`` (Ray object ref -> the worker running it).

    Raises :class:`WorkerError` when a worker dies, misses a heartbeat or the call times out,
    and re-raises a worker's own exception when every worker has finished (all raised the same
    error, e.g. on bad input).  ``ping(worker)`` returns a ref answered by a worker thread that
    runs beside the call.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

    pending = dict(calls)
    pings: dict[Any, tuple[WorkerInfo, float]] = {}
    last_ping: dict[int, float] = {}
    results: dict[int, Any] = {}
    failure: tuple[WorkerInfo, BaseException] | None = None
    failure_at = 0.0
    start = time.monotonic()
    while pending:
        now = time.monotonic()
        if failure is not None and now - failure_at > timeouts.grace:
            w, err = failure
            stuck = ", ".join(str(x) for x in pending.values())
            raise WorkerError(f"{what}: {w} raised {type(err).__name__}: {err}; {stuck} still "
                              f"running after {timeouts.grace:g} s (waiting for it in a "
                              f"collective)", [w, *pending.values()]) from err
        if timeouts.call is not None and now - start > timeouts.call:
            late = ", ".join(str(x) for x in pending.values())
            raise WorkerError(f"{what} timed out after {timeouts.call:g} s on {late}",
                              list(pending.values()))
        for w, sent in pings.values():
            if now - sent > timeouts.heartbeat_timeout:
                raise WorkerError(f"{what}: {w} has not answered a heartbeat for "
                                  f"{now - sent:.0f} s (hung, stopped or cut off)", [w])
        running = {w.rank for w in pending.values()} - {w.rank for w, _ in pings.values()}
        for w in pending.values():
            if w.rank in running and now - last_ping.get(w.rank, start) >= \
                    timeouts.heartbeat_interval:
                pings[ping(w)] = (w, now)
                last_ping[w.rank] = now
        ready, _ = ray.wait(list(pending) + list(pings), num_returns=1, timeout=0.25)
        for ref in ready:
            if ref in pings:
                w, _ = pings.pop(ref)
                try:
                    ray.get(ref, timeout=0)
                except (RayActorError, GetTimeoutError, RayError) as e:
                    raise WorkerError(f"{what}: {w} died ({_reason(e)})", [w]) from e
                continue
            w = pending.pop(ref)
            try:
                results[w.rank] = ray.get(ref, timeout=0)
            except RayActorError as e:
                raise WorkerError(f"{what}: {w} died ({_reason(e)})", [w]) from e
            except RayTaskError as e:
                if failure is None:
                    failure = (w, e.cause if e.cause is not None else e)
                    failure_at = time.monotonic()
            except RayError as e:
                raise WorkerError(f"{what}: {w} failed: {_reason(e)}", [w]) from e
    if failure is not None:
        w, err = failure
        if isinstance(err, Exception):
            err.add_note(f"(raised on {w} during {what})")
        raise err
    return results


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return " ".join(line.strip() for line in text[:3])[:400] or type(e).__name__


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------
@functools.cache
def source_digest() -> str:
    """sha256 (first 12 hex digits) of optkit's Python sources: two hosts with the same
    digest run the same optkit code."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def local_versions() -> dict[str, str]:
    """This process's versions (the keys of :data:`CORE_VERSIONS` and installed plugins)."""
    out = {"python": platform.python_version(), "optkit": __version__,
           "optkit source": source_digest()}
    for dist in ("jax", "jaxlib", *PLUGINS):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist in CORE_VERSIONS:
                out[dist] = "missing"
    return out


def check_versions(driver: Mapping[str, str],
                   workers: Sequence[tuple[WorkerInfo, Mapping[str, str]]]) -> None:
    """Raise :class:`VersionMismatchError` naming every host whose versions differ from the
    driver's (core fields) or from worker 0's (accelerator plugins)."""
    problems, bad = [], []
    first = workers[0][1] if workers else {}
    for w, v in workers:
        diffs = [f"{k} {v.get(k, 'missing')} (driver {driver.get(k, 'missing')})"
                 for k in CORE_VERSIONS if v.get(k) != driver.get(k)]
        diffs += [f"{k} {v.get(k, 'missing')} (worker 0 {first.get(k, 'missing')})"
                  for k in PLUGINS if v.get(k) != first.get(k)]
        if diffs:
            problems.append(f"  {w}: " + ", ".join(diffs))
            bad.append(w)
    if problems:
        raise VersionMismatchError(
            "software differs between hosts; every host needs the driver's Python, JAX, "
            "jaxlib and optkit (same source):\n" + "\n".join(problems), bad)


# --------------------------------------------------------------------------------------------
# Weights on every host
# --------------------------------------------------------------------------------------------
def weights_report(short: str, path) -> dict:
    """What this host sees at ``path`` for model ``short``: the folder, its files and sizes,
    and the config it holds (run on each worker)."""
    from optkit.lm import weights_location
    from optkit.weights.sources import open_weights

    try:
        loc = weights_location(short, path)
        own, _ = open_weights(loc)
    except (WeightError, ValueError, OSError) as e:
        return {"found": False, "error": str(e)}
    files = {}
    for f in sorted(Path(loc).iterdir()) if Path(loc).is_dir() else [Path(loc)]:
        if f.is_file():
            files[f.name] = f.stat().st_size
    small = {}
    for name in ("config.json", "optkit-manifest.json"):
        p = Path(loc) / name
        if p.is_file():
            small[name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return {"found": True, "location": os.fspath(loc), "files": files, "digests": small,
            "config": own}


def check_weights(reports: Sequence[tuple[WorkerInfo, dict]], short: str, path) -> dict:
    """Raise :class:`~optkit.weights.folder.WeightError` naming the hosts that lack the
    weights or hold different files; else return worker 0's report."""
    missing = [(w, r) for w, r in reports if not r["found"]]
    if missing:
        lines = "\n".join(f"  {w}: {r['error']}" for w, r in missing)
        have = [str(w) for w, r in reports if r["found"]]
        raise WeightError(
            f"the weights of {short} (path={path!r}) are missing on "
            f"{len(missing)} of {len(reports)} hosts:\n{lines}\n"
            + (f"  (found on {', '.join(have)})\n" if have else "")
            + "Every host needs the weights at the same path, or a shared filesystem.")
    w0, r0 = reports[0]
    for w, r in reports[1:]:
        diffs = []
        for name in sorted(set(r0["files"]) | set(r["files"])):
            a, b = r0["files"].get(name), r["files"].get(name)
            if a != b:
                diffs.append(f"{name}: {_size(a)} on {w0.host}, {_size(b)} on {w.host}")
        for name in sorted(set(r0["digests"]) | set(r["digests"])):
            if r0["digests"].get(name) != r["digests"].get(name):
                diffs.append(f"{name}: contents differ")
        if diffs:
            more = f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise WeightError(
                f"the weights of {short} differ between {w0} at {r0['location']} and {w} at "
                f"{r['location']}: " + "; ".join(diffs[:5]) + more
                + ". Copy the same folder to every host (or use a shared filesystem).")
    return r0


def _size(n: int | None) -> str:
    return "missing" if n is None else f"{n:,} bytes"
