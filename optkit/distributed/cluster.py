"""A Ray cluster of JAX processes: connect (or start Ray locally), one actor per host, join
``jax.distributed``, call every worker, fail loudly, shut down.

``RayCluster("auto")`` connects to the cluster this machine belongs to (``ray start --head``
on one node, ``ray start --address=HEAD:6379`` on the others); ``RayCluster()`` starts a
local Ray (or uses the one ``ray.init`` already started).  One worker process runs per Ray
node (``processes=`` puts several on each node, e.g. two CPU processes on one machine
standing in for two hosts), each holding all GPUs of its node (or ``cpu_devices`` CPU
devices); worker 0 hosts the JAX coordinator.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from optkit.distributed.health import (
    Timeouts,
    WorkerError,
    WorkerInfo,
    check_versions,
    local_versions,
    wait_all,
)

log = logging.getLogger(__name__)


class RayCluster:
    """JAX processes on a Ray cluster, started by :meth:`start`.

    Args:
      address: ``None`` (use the running Ray, else start one locally), ``"auto"``,
        ``"ray://head:10001"`` (Ray Client) or ``"head:6379"``.
      processes: JAX processes (default: one per alive Ray node; a multiple of the node count).
      platform: ``"auto"`` (GPUs when every node has some, else CPU), ``"gpu"`` or ``"cpu"``.
      cpu_devices: devices per process on CPU (``jax_num_cpu_devices``).
      gpus_per_process: default: the node's GPUs divided among its processes.
      cpus_per_process: Ray CPU resources each worker reserves.
      heartbeat_interval, heartbeat_timeout, call_timeout, grace: see
        :class:`~optkit.distributed.health.Timeouts`.
      startup_timeout: bound on starting the processes and joining ``jax.distributed``.
      runtime_env: extra Ray runtime environment for the workers (``env_vars``,
        ``py_modules``, ...).
      ray_init: extra ``ray.init`` arguments when this object starts or connects Ray.
    """

    def __init__(self, address: str | None = None, *, processes: int | None = None,
                 platform: str = "auto", cpu_devices: int = 1,
                 gpus_per_process: int | None = None, cpus_per_process: float = 1,
                 heartbeat_interval: float = 2.0, heartbeat_timeout: float = 30.0,
                 call_timeout: float | None = None, grace: float = 10.0,
                 startup_timeout: float = 300.0, runtime_env: dict | None = None,
                 ray_init: dict | None = None):
        if platform not in ("auto", "gpu", "cpu"):
            raise ValueError(f"platform must be auto, gpu or cpu; got {platform!r}")
        if processes is not None and processes < 1:
            raise ValueError(f"processes must be >= 1; got {processes}")
        self.address = address
        self.processes = processes
        self.platform = platform
        self.cpu_devices = int(cpu_devices)
        self.gpus_per_process = gpus_per_process
        self.cpus_per_process = cpus_per_process
        self.timeouts = Timeouts(heartbeat_interval, heartbeat_timeout, call_timeout, grace)
        self.startup_timeout = startup_timeout
        self.runtime_env = dict(runtime_env or {})
        self.ray_init = dict(ray_init or {})
        self.workers: list[WorkerInfo] = []
        self.devices: list[dict] = []
        self._actors: list[Any] = []
        self._owns_ray = False
        self._failed: str | None = None
        self._lock = threading.RLock()
        self._model_ids = itertools.count()
        self._unloads: collections.deque[int] = collections.deque()

    # Lifecycle -----------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return bool(self._actors) and self._failed is None

    def start(self) -> RayCluster:
        """Start the worker processes (a no-op when running; after a failure, call
        :meth:`restart`)."""
        with self._lock:
            if self.started:
                return self
            if self._failed is not None:
                raise WorkerError(f"this cluster failed ({self._failed}); call restart()")
            self._connect()
            try:
                self._start_workers()
            except BaseException:
                self._kill_all()
                raise
            log.info("Ray cluster up:\n%s", self.describe())
            return self

    def restart(self) -> RayCluster:
        """Stop every worker (whatever its state) and start fresh ones; models must be loaded
        again."""
        with self._lock:
            self._stop_workers()
            self._failed = None
            return self.start()

    def shutdown(self) -> None:
        """Leave ``jax.distributed``, end the worker processes and, if this object started
        Ray, stop it."""
        import ray

        with self._lock:
            self._stop_workers()
            self._failed = None
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
                self._owns_ray = False

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # Calls ---------------------------------------------------------------------------------
    def call(self, method: str, *args, per_rank: Sequence[tuple] | None = None,
             timeouts: Timeouts | None = None, what: str | None = None) -> list:
        """``method(*args)`` on every worker (or ``method(*per_rank[r])`` on worker ``r``);
        results by rank.  A dead or hung worker raises :class:`WorkerError` and stops the
        cluster (the others may be blocked in a collective)."""
        with self._lock:
            if self._failed is not None:
                raise WorkerError(f"the cluster failed earlier ({self._failed}); call "
                                  f"restart() and load the model again")
            if not self._actors:
                raise WorkerError("the cluster is not started; call start()")
            refs = {}
            for rank, (actor, w) in enumerate(zip(self._actors, self.workers, strict=True)):
                a = per_rank[rank] if per_rank is not None else args
                refs[getattr(actor, method).remote(*a)] = w
            try:
                results = wait_all(refs, self._ping, timeouts or self.timeouts,
                                   what or method)
            except WorkerError as e:
                self._fail(str(e))
                raise
            return [results[w.rank] for w in self.workers]

    def next_model_id(self) -> int:
        return next(self._model_ids)

    def unload(self, model_id: int) -> None:
        """Drop a model on the workers with the next call (safe from finalizers)."""
        self._unloads.append(model_id)

    def take_unloads(self) -> list[int]:
        out = []
        while self._unloads:
            out.append(self._unloads.popleft())
        return out

    @property
    def num_devices(self) -> int:
        return sum(d["local_devices"] for d in self.devices)

    def describe(self) -> str:
        rows = [f"{len(self.workers)} JAX processes, {self.num_devices} devices"]
        for w, d in zip(self.workers, self.devices, strict=False):
            rows.append(f"  {w}: {d['local_devices']} x {d['device_kind']} "
                        f"({d['platform']}), process {d['process_index']}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        state = "failed" if self._failed else "running" if self._actors else "stopped"
        n = len(self.workers) or self.processes
        return f"RayCluster(address={self.address!r}, processes={n}, {state})"

    # Internals -----------------------------------------------------------------------------
    def _connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kw = dict(self.ray_init)
        if self.address is None:
            kw.setdefault("include_dashboard", False)
            if self.processes:
                kw.setdefault("num_cpus", max(self.processes * self.cpus_per_process, 1))
        else:
            kw["address"] = self.address
        ray.init(**kw)
        self._owns_ray = True

    def _nodes(self) -> list[dict]:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        head = "node:__internal_head__"
        nodes.sort(key=lambda n: (head not in n["Resources"], n["NodeManagerAddress"]))
        return nodes

    def _start_workers(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from optkit.distributed.worker import JaxWorker

        nodes = self._nodes()
        n = self.processes or len(nodes)
        if n % len(nodes):
            raise ValueError(f"processes={n} is not a multiple of the {len(nodes)} Ray nodes "
                             "(one JAX process per host, or the same number on each)")
        per_node = n // len(nodes)
        gpus = [int(node["Resources"].get("GPU", 0)) for node in nodes]
        platform = self.platform
        if platform == "auto":
            platform = "gpu" if all(gpus) else "cpu"
        if platform == "gpu" and not all(gpus):
            bare = [node["NodeManagerAddress"] for node, g in zip(nodes, gpus, strict=True)
                    if not g]
            raise ValueError(f"platform='gpu' but Ray nodes {bare} have no GPUs")
        env = dict(self.runtime_env)
        env_vars = dict(env.get("env_vars", {}))
        if platform == "cpu":
            env_vars.setdefault("JAX_PLATFORMS", "cpu")
            env_vars["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={self.cpu_devices}"
        else:
            env_vars.setdefault("JAX_PLATFORMS", "cuda")
        env["env_vars"] = env_vars
        actor_cls = ray.remote(concurrency_groups={"health": 1})(JaxWorker)
        self._actors, self.workers, self.devices = [], [], []
        for rank in range(n):
            node = nodes[rank // per_node]
            opts = {"num_cpus": self.cpus_per_process, "runtime_env": env, "max_restarts": 0,
                    "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"],
                                                                          soft=False)}
            if platform == "gpu":
                opts["num_gpus"] = self.gpus_per_process or gpus[rank // per_node] // per_node
            self._actors.append(actor_cls.options(**opts).remote(rank))
        # Until each worker reports, it is known by its node only.
        self.workers = [WorkerInfo(r, nodes[r // per_node]["NodeManagerAddress"],
                                   nodes[r // per_node]["NodeManagerAddress"], 0)
                        for r in range(n)]
        start = Timeouts(self.timeouts.heartbeat_interval, self.startup_timeout,
                         self.startup_timeout, self.timeouts.grace)
        infos = self.call("info", timeouts=start, what="starting the worker processes")
        self.workers = [WorkerInfo(r, i["host"], i["ip"], i["pid"], i["node_id"])
                        for r, i in enumerate(infos)]
        check_versions(local_versions(), [(w, i["versions"])
                                          for w, i in zip(self.workers, infos, strict=True)])
        port = self.call("free_port", what="choosing the coordinator port")[0]
        coordinator = f"{self.workers[0].ip}:{port}"
        args = (coordinator, n, platform, self.cpu_devices, self.startup_timeout,
                self.timeouts.heartbeat_timeout)
        self.devices = self.call("init_jax", *args, timeouts=start,
                                 what=f"joining jax.distributed at {coordinator}")

    def _ping(self, w: WorkerInfo):
        return self._actors[w.rank].ping.remote()

    def _fail(self, reason: str) -> None:
        log.error("stopping the Ray cluster: %s", reason)
        self._failed = reason
        self._kill_all()

    def _stop_workers(self) -> None:
        if self._actors and self._failed is None:
            try:
                self.call("shutdown_jax", timeouts=Timeouts(1.0, 10.0, 30.0, 1.0),
                          what="leaving jax.distributed")
            except Exception as e:  # the processes end below either way
                log.warning("clean shutdown failed (%s); killing the workers", e)
        self._kill_all()

    def _kill_all(self, wait: float = 15.0) -> None:
        """End every worker process and wait (bounded) until Ray reports them dead."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        actors, self._actors = self._actors, []
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:
                log.debug("ray.kill: %s", e)
        deadline = time.monotonic() + wait
        for a in actors:
            while time.monotonic() < deadline:
                try:
                    ray.get(a.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                except (RayActorError, GetTimeoutError):
                    break
                except Exception:
                    break
                time.sleep(0.05)
