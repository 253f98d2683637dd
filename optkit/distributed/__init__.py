"""Multi-host inference on a Ray cluster: one JAX process per host, one global mesh.

Processes and threads::

    driver (your Python / notebook / ``optkit serve``)
      RemoteOPT.generate -> optkit.generation -> RemoteExecutor     runner.py
        every executor call -> RayCluster.call: the same call to each worker, then
        wait_all (heartbeats; a dead or silent worker -> WorkerError)  cluster.py, health.py
    worker r (a Ray actor, one per host; r = jax.process_index())     worker.py
      default thread: jax.distributed member; runs the calls in order on the executor
        (MeshExecutor / PipelineExecutor over the global mesh) -- all processes run the
        same SPMD program; KV caches stay here, named by the driver
      "health" thread: answers pings while a call computes or waits in a collective

Tensor parallelism over processes is one mesh spanning them; pipeline stages on different
processes pass activations with a ``ppermute`` over the two stages' devices inside the same
SPMD program (``optkit.parallel.transfer``).  Results come back from the process that holds
them (``wire.py``).

``get_model("alpa/opt-66b", path=..., cluster="auto")`` or
``get_model(..., cluster=RayCluster(...))`` returns a model whose ``generate``, ``__call__``
and serving work as on one machine.
"""

from optkit.distributed.cluster import RayCluster
from optkit.distributed.health import VersionMismatchError, WorkerError, WorkerInfo
from optkit.distributed.runner import CacheHandle, RemoteExecutor, RemoteOPT, load_model

__all__ = ["CacheHandle", "RayCluster", "RemoteExecutor", "RemoteOPT", "VersionMismatchError",
           "WorkerError", "WorkerInfo", "load_model"]
