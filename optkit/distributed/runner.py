"""The driver side: a model on a Ray cluster behind the ordinary executor interface.

:func:`load_model` (``get_model("alpa/...", cluster=...)``) checks the weights on every host,
chooses or validates the plan over the cluster's devices, loads each process's slices and
returns a :class:`RemoteOPT` (a :class:`~optkit.lm.JaxOPT`), so ``generate``, ``__call__``,
``generate_text`` and the serving engine run unchanged.

:class:`RemoteExecutor` has the executor methods (``init_cache``, ``prefill``, ``decode``,
``decode_loop``, ``logits``, ``select``, ``insert``).  Each call goes to every worker (the
same SPMD step on every process) and its results come back as JAX arrays on the driver's
default device.  A KV cache is a :class:`CacheHandle`: the arrays stay on the workers; a
donated handle cannot be used again, and a handle the driver drops is freed on the workers
with the next call.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import weakref
from typing import Any

import numpy as np

from optkit.config import OPTConfig
from optkit.distributed import wire
from optkit.distributed.cluster import RayCluster
from optkit.distributed.health import check_weights
from optkit.lm import JaxOPT, split_name
from optkit.options import ModelOptions
from optkit.parallel.executor import LIVE_BUCKET

log = logging.getLogger(__name__)


class CacheHandle:
    """A KV cache held by the workers (``batch`` rows of ``length`` positions)."""

    #: The cache has no driver-side placement: loop state built "like the cache" stays on
    #: the driver's default device (see ``optkit.generation.search.replicate_like``).
    sharding = None

    def __init__(self, owner: RemoteExecutor, cid: int, batch: int, length: int, nbytes: int):
        self.id, self.batch, self.length, self.nbytes = cid, batch, length, nbytes
        self.donated = False
        self._finalizer = weakref.finalize(self, owner._release, cid)

    def _donate(self) -> None:
        self.donated = True
        self._finalizer.detach()

    def __repr__(self) -> str:
        state = ", donated" if self.donated else ""
        return f"CacheHandle(id={self.id}, batch={self.batch}, length={self.length}{state})"


class RemoteExecutor:
    """An executor whose model runs on every process of a :class:`RayCluster`."""

    def __init__(self, cluster: RayCluster, cfg: OPTConfig, plan, dtype, model_id: int):
        import jax.numpy as jnp

        self.cluster = cluster
        self.cfg = cfg
        self.plan = plan
        self.rules = dict(plan.rules)
        self.dtype = jnp.dtype(dtype)
        self.num_devices = plan.num_devices
        self._model_id = model_id
        self._ids = itertools.count()
        self._fn_ids: dict[Any, int] = {}
        self._new_fns: list[tuple[int, bytes]] = []
        self._free: collections.deque[int] = collections.deque()
        self._lock = threading.RLock()
        weakref.finalize(self, cluster.unload, model_id)

    # Plumbing ------------------------------------------------------------------------------
    def _release(self, cid: int) -> None:
        self._free.append(cid)

    def _fn_id(self, fn) -> int:
        if fn not in self._fn_ids:
            from ray import cloudpickle

            self._fn_ids[fn] = fid = len(self._fn_ids)
            self._new_fns.append((fid, cloudpickle.dumps(fn)))
        return self._fn_ids[fn]

    def _sync(self) -> dict:
        free = []
        while self._free:
            free.append(self._free.popleft())
        fns, self._new_fns = self._new_fns, []
        return {"free": free, "fns": fns, "unload": self.cluster.take_unloads()}

    @staticmethod
    def _check(cache) -> CacheHandle:
        if not isinstance(cache, CacheHandle):
            raise TypeError(f"expected a cache made by this executor; got {type(cache).__name__}")
        if cache.donated:
            raise ValueError(f"{cache} was donated to an earlier call; use the cache that call "
                             f"returned")
        return cache

    def _run(self, op: str, *args, cache: CacheHandle | None = None, donate: bool = False,
             shape: tuple[int, int] | None = None):
        """Run ``op`` on every worker; returns (merged value, new cache handle or None)."""
        with self._lock:
            out = next(self._ids) if shape is not None else None
            ids = () if cache is None else (self._check(cache).id,)
            payload = wire.to_wire((*ids, *(() if out is None else (out,)), *args))
            results = self.cluster.call("run", self._model_id, op, self._sync(), payload,
                                        what=op)
            value = wire.from_wire(wire.merge([r["value"] for r in results]), on_device=True)
            if donate:
                cache._donate()
            new = None if out is None else CacheHandle(self, out, *shape, results[0]["nbytes"])
            return value, new

    # The executor interface ----------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> CacheHandle:
        return self._run("init_cache", int(batch), int(max_len), shape=(batch, max_len))[1]

    def prefill(self, tokens, attention_mask, cache, all_logits: bool = False):
        """Prompts (B,T) into an empty cache -> (logits, cache); the old cache is donated."""
        tokens = np.asarray(tokens, np.int32)
        return self._run("prefill", tokens, np.asarray(attention_mask, np.int32),
                         bool(all_logits), cache=cache, donate=True,
                         shape=(cache.batch, cache.length))

    def decode(self, tokens, cache, live: int | None = None):
        return self._run("decode", np.asarray(tokens, np.int32), live, cache=cache,
                         donate=True, shape=(cache.batch, cache.length))

    def decode_loop(self, step_fn, tokens, cache, state, num_steps: int,
                    live: int | None = None, max_steps: int | None = None):
        """``num_steps`` decode steps in one call on every worker; ``step_fn`` is sent
        once (pickled) and kept by the workers, so its compiled loop is reused."""
        with self._lock:
            fid = self._fn_id(step_fn)
            (tok, state, outs), new = self._run(
                "decode_loop", fid, np.asarray(tokens, np.int32), state, int(num_steps), live,
                max_steps, cache=cache, donate=True, shape=(cache.batch, cache.length))
        return tok, new, state, outs

    def dispatch_span(self, position: int, remaining: int, batch: int, max_len: int) -> int:
        """Decode steps per dispatch: up to the end of the current live bucket (whether the
        workers' attention reads only written positions is not known here)."""
        return max(1, min(remaining, -(-(position + 1) // LIVE_BUCKET) * LIVE_BUCKET - position))

    def logits(self, tokens, attention_mask=None):
        tokens = np.asarray(tokens, np.int32)
        if attention_mask is None:
            attention_mask = np.ones(tokens.shape, np.int32)
        return self._run("logits", tokens, np.asarray(attention_mask, np.int32))[0]

    def select(self, cache, rows):
        rows = np.asarray(rows, np.int32)
        return self._run("select", rows, cache=cache, shape=(len(rows), cache.length))[1]

    def insert(self, cache, prefix, slot: int):
        prefix = self._check(prefix)
        return self._run("insert", prefix.id, int(slot), cache=cache, donate=True,
                         shape=(cache.batch, cache.length))[1]

    def live_caches(self) -> int:
        """Caches the workers hold for this model (after freeing dropped handles)."""
        return self._run("num_caches")[0]


class RemoteOPT(JaxOPT):
    """A :class:`~optkit.lm.JaxOPT` whose executor runs on a Ray cluster.  ``close()`` stops
    the cluster when the model started it (``cluster=`` given as an address)."""

    def __init__(self, executor: RemoteExecutor, name: str, plan, owns_cluster: bool):
        super().__init__(executor, name=name, backend="alpa", plan=plan)
        self.cluster = executor.cluster
        self._owns_cluster = owns_cluster

    def close(self) -> None:
        """Stop the cluster if this model started it; else free the model on the workers
        (with the cluster's next call)."""
        if self._owns_cluster:
            self.cluster.shutdown()
        else:
            self.cluster.unload(self.executor._model_id)

    def __enter__(self) -> RemoteOPT:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        import jax.numpy as jnp

        return (f"RemoteOPT({self.name or self.config.name}, plan={self.plan.name}, "
                f"dtype={jnp.dtype(self.dtype).name}, devices={self.executor.num_devices} "
                f"over {len(self.cluster.workers)} processes)")


def choose_plan(cfg: OPTConfig, plan, cluster: RayCluster, options: ModelOptions,
                progress: bool = True):
    """The given :class:`~optkit.parallel.Plan` (checked against the cluster) or the
    planner's choice for the cluster's devices (described by worker 0, grouped by host)."""
    from optkit.parallel import Cluster, Plan, PlanError
    from optkit.parallel.planner import auto_plan, auto_plan_options

    count = cluster.num_devices
    if isinstance(plan, Plan):
        plan.validate(cfg)
        if plan.num_devices > count:
            raise PlanError(f"plan {plan.name} needs {plan.num_devices} devices; the cluster "
                            f"has {count} ({len(cluster.workers)} processes)")
        return plan
    if plan is not None and plan != "auto" and not isinstance(plan, dict):
        raise TypeError(f"plan must be a Plan, 'auto' or a dict of planner options; got "
                        f"{type(plan).__name__}")
    opts = auto_plan_options(cfg, plan, options)
    per_host = cluster.devices[0]["local_devices"] if len(cluster.workers) > 1 else None
    described = Cluster(cluster.devices[0]["spec"], count, per_host=per_host)
    report = auto_plan(cfg, cluster=described, progress=progress, **opts)
    log.info("automatic plan for %s on %s:\n%s", cfg.name, described.describe(),
             report.best.describe(cfg, quantize=options.quantize))
    return report.best


def load_model(cluster: RayCluster | str, model_name: str, path=None,
               options: ModelOptions | None = None, dummy: bool = False, plan=None,
               seed: int = 0, config: OPTConfig | None = None, checksums: bool = False,
               progress: bool = True) -> RemoteOPT:
    """``get_model(model_name, ..., cluster=cluster)``: an ``alpa/`` model on a Ray cluster,
    loaded and run as ``options`` say (default :class:`~optkit.options.ModelOptions`).

    ``cluster`` is a :class:`RayCluster` (started if needed) or an address (a cluster this
    model starts and :meth:`RemoteOPT.close` stops).  The weights must be at ``path`` on
    every host (or a shared filesystem); ``path`` is resolved on each host.
    """
    options = options or ModelOptions()
    backend, short = split_name(model_name)
    if backend != "alpa":
        raise ValueError(f"cluster= runs alpa/ models (the plan spans the cluster's devices); "
                         f"got {model_name!r}")
    owns = not isinstance(cluster, RayCluster)
    if owns:
        cluster = RayCluster(cluster)
    cluster.start()
    try:
        cfg = config
        if not dummy:
            reports = cluster.call("weights_report", short, path, what="checking the weights")
            first = check_weights(list(zip(cluster.workers, reports, strict=True)), short, path)
            cfg = cfg or first["config"]
        cfg = cfg or OPTConfig.from_name(short)
        plan = choose_plan(cfg, plan, cluster, options, progress)
        model_id = cluster.next_model_id()
        spec = {"short": short, "path": path, "dummy": dummy, "config": cfg, "plan": plan,
                "options": options, "seed": seed, "checksums": checksums}
        info = cluster.call("load", model_id, spec, cluster.take_unloads(),
                            what=f"loading {model_name}")[0]
    except BaseException:
        if owns:
            cluster.shutdown()
        raise
    executor = RemoteExecutor(cluster, cfg, plan, info["dtype"], model_id)
    return RemoteOPT(executor, model_name, plan, owns)
