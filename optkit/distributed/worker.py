"""The per-host actor: one JAX process that joins ``jax.distributed`` and runs the executor.

Every worker holds the same executor over the global mesh (its process loads only its own
devices' weight slices) and runs the driver's calls in the same order, so all processes
execute the same SPMD program.  KV caches stay on the workers, named by ids the driver
chooses; step functions arrive pickled once and are kept by id (a stable function object
per id, so compiled decode loops are reused).

Calls run on the actor's default thread, one at a time; :meth:`JaxWorker.ping` runs on a
thread of its own ("health" concurrency group), so heartbeats are answered while a call
computes or waits in a collective.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from typing import Any

import ray

from optkit.distributed import wire
from optkit.distributed.health import local_versions, weights_report


def jax_heartbeat(driver_timeout: float) -> int:
    """``jax.distributed``'s own heartbeat timeout: well above the driver's, so a frozen
    process is reported by the driver (naming it) before JAX's coordination service aborts
    the process hosting the coordinator (which would name the wrong worker)."""
    return int(2 * driver_timeout + 10)


class JaxWorker:
    """One JAX process of a :class:`~optkit.distributed.cluster.RayCluster` (a Ray actor)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.models: dict[int, _Model] = {}
        self.processes = 1

    # Health (own thread) ------------------------------------------------------------------
    @ray.method(concurrency_group="health")
    def ping(self) -> float:
        return time.time()

    # Start-up and shutdown -----------------------------------------------------------------
    def info(self) -> dict:
        return {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "versions": local_versions()}

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def init_jax(self, coordinator: str, num_processes: int, platform: str, cpu_devices: int,
                 init_timeout: float, heartbeat_timeout: float) -> dict:
        """Configure JAX and join the global mesh (before any JAX backend starts)."""
        import jax

        if platform == "cpu":
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", int(cpu_devices))
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if num_processes > 1:
            if platform == "cpu":  # gloo collectives can starve XLA:CPU's threads
                from optkit.parallel.dispatch import set_synchronous

                set_synchronous(True)
            jax.distributed.initialize(coordinator, num_processes, self.rank,
                                       initialization_timeout=int(init_timeout),
                                       heartbeat_timeout_seconds=jax_heartbeat(heartbeat_timeout))
        self.processes = num_processes
        from optkit.parallel.devices import Cluster

        local = jax.local_devices()
        return {"process_index": jax.process_index(), "process_count": jax.process_count(),
                "devices": len(jax.devices()), "local_devices": len(local),
                "platform": local[0].platform, "device_kind": local[0].device_kind,
                "spec": Cluster.from_devices(local).device}

    def shutdown_jax(self) -> None:
        self.models = {}
        if self.processes > 1:
            import jax

            jax.distributed.shutdown()
            self.processes = 1

    # Models --------------------------------------------------------------------------------
    def weights_report(self, short: str, path) -> dict:
        return weights_report(short, path)

    def load(self, model_id: int, spec: dict, unload: list[int]) -> dict:
        """Build this process's part of the executor of ``spec`` (a model under a plan)
        after dropping the models in ``unload``."""
        import jax
        import jax.numpy as jnp

        from optkit.lm import weights_location
        from optkit.parallel.build import build_executor
        from optkit.weights.sources import open_weights

        for m in unload:
            self.models.pop(m, None)
        store = None
        if not spec["dummy"]:
            _, store = open_weights(weights_location(spec["short"], spec["path"]))
        executor = build_executor(spec["config"], spec["plan"], store, devices=jax.devices(),
                                  options=spec["options"], seed=spec["seed"],
                                  checksums=spec["checksums"], progress=False)
        self.models[model_id] = _Model(executor)
        return {"dtype": jnp.dtype(executor.dtype).name}

    # Executor calls ------------------------------------------------------------------------
    def run(self, model_id: int, op: str, sync: dict, args: tuple) -> dict:
        """Run executor call ``op`` of model ``model_id`` with ``args`` (from the driver)
        after applying ``sync`` (models to drop, cache ids to free, new step functions).
        Returns ``{"value": results this process returns, "nbytes": a new cache's size}``."""
        for m in sync["unload"]:
            self.models.pop(m, None)
        model = self.models.get(model_id)
        if model is None:
            raise RuntimeError(f"model {model_id} is not loaded on this worker (it was "
                               "unloaded, or the cluster restarted): load it again")
        for cid in sync["free"]:
            model.caches.pop(cid, None)
        for fid, blob in sync["fns"]:
            model.fns[fid] = pickle.loads(blob)
        return getattr(model, op)(*wire.from_wire(args))


class _Model:
    """One loaded model on a worker: its executor, live caches and step functions by id."""

    def __init__(self, executor):
        self.executor = executor
        self.caches: dict[int, Any] = {}
        self.fns: dict[int, Any] = {}

    def _keep(self, out: int, cache, value=None) -> dict:
        import jax

        self.caches[out] = cache
        return {"value": wire.fetch(value),
                "nbytes": int(sum(x.nbytes for x in jax.tree.leaves(cache)))}

    def init_cache(self, out, batch, max_len):
        return self._keep(out, self.executor.init_cache(batch, max_len))

    def prefill(self, cid, out, tokens, mask, all_logits):
        logits, cache = self.executor.prefill(tokens, mask, self.caches[cid], all_logits)
        del self.caches[cid]
        return self._keep(out, cache, logits)

    def decode(self, cid, out, tokens, live):
        logits, cache = self.executor.decode(tokens, self.caches[cid], live)
        del self.caches[cid]
        return self._keep(out, cache, logits)

    def decode_loop(self, cid, out, fid, tokens, state, num_steps, live, max_steps):
        tok, cache, state, outs = self.executor.decode_loop(
            self.fns[fid], tokens, self.caches[cid], state, num_steps, live, max_steps)
        del self.caches[cid]
        return self._keep(out, cache, (tok, state, outs))

    def select(self, cid, out, rows):
        return self._keep(out, self.executor.select(self.caches[cid], rows))

    def insert(self, cid, out, prefix, slot):
        cache = self.executor.insert(self.caches[cid], self.caches[prefix], slot)
        del self.caches[cid]
        return self._keep(out, cache)

    def logits(self, tokens, mask):
        return {"value": wire.fetch(self.executor.logits(tokens, mask)), "nbytes": 0}

    def num_caches(self):
        return {"value": len(self.caches), "nbytes": 0}
