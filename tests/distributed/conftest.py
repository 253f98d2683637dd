"""One local Ray for the distributed tests, two CPU JAX processes standing in for two hosts.

Ray is started once for the package (package-scoped fixtures, lightly: no dashboard, no
pre-started idle workers, no usage stats) and must leave no process behind.
"""

import os

import numpy as np
import psutil
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray starts its workers at nice 15: beside any other job on the cores (the other xdist
# worker, a second test run) they would get a few percent of a core and crawl for minutes.
os.environ.setdefault("RAY_worker_niceness", "0")

#: prompts for the shared random opt-tiny folder (``weights``)
PROMPTS = np.array([[2, 100, 200, 300, 400, 500], [1, 1, 2, 7, 8, 9]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
#: seconds Ray's and the workers' processes may take to exit after shutdown (a busy machine)
LEAVE_S = 120


def ray_processes() -> list[psutil.Process]:
    """This process's Ray children (gcs, raylet, agents, workers)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(p.cmdline()).lower() or p.name().startswith("ray"):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="package")
def ray_session():
    import ray

    assert not ray.is_initialized()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 2**20)
    yield ray
    ray.shutdown()
    gone, alive = psutil.wait_procs(ray_processes(), timeout=LEAVE_S)
    assert not alive, f"Ray processes left behind: {alive}"


@pytest.fixture(scope="package")
def weights(tiny_weights):
    """The shared random opt-tiny folder (tests/conftest.py)."""
    return tiny_weights


@pytest.fixture(scope="package")
def reference(weights):
    """The same weights on one device in this process."""
    from optkit import get_model

    return get_model("jax/opt-tiny", path=weights, progress=False)


@pytest.fixture(scope="package")
def cluster(ray_session):
    """Two JAX processes with two CPU devices each (4 global devices)."""
    from optkit.distributed import RayCluster

    # Faults are tested with a cluster of their own (test_faults.py); here a heartbeat only
    # bounds a hang, so it is minutes: a worker slowed by other jobs on the cores is alive.
    c = RayCluster(processes=2, cpu_devices=2, heartbeat_interval=0.5, heartbeat_timeout=120,
                   grace=60).start()
    yield c
    pids = [w.pid for w in c.workers]
    c.shutdown()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=LEAVE_S)
    assert not alive, f"worker processes left behind: {alive}"
