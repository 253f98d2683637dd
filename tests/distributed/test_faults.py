"""Faults across hosts: a worker killed or frozen mid-generation becomes a clear error on the
driver in bounded time; the cluster then restarts; versions and weights are checked."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from optkit import get_model
from optkit.distributed import RayCluster, VersionMismatchError, WorkerError, WorkerInfo
from optkit.distributed.health import check_versions, check_weights, local_versions
from optkit.parallel import Plan
from optkit.weights.folder import WeightError
from tests.distributed.conftest import LEAVE_S, MASK, PROMPTS

pytestmark = pytest.mark.xdist_group("ray")

#: what the fault tests detect a frozen worker by: long enough that a worker slowed by other
#: jobs on the cores (compiling, say) still answers in time, short enough to wait for
HEARTBEAT_TIMEOUT = 20.0


def fault_mid_generation(cluster, weights, sig):
    """Start a long generation, send ``sig`` to worker 1 after a few tokens; the exception
    generate raised and the seconds from the signal to it."""
    model = get_model("alpa/opt-tiny", path=weights, plan=Plan(tp=2, pp=2, micro_batches=2),
                      cluster=cluster)
    started, out = threading.Event(), {}

    def on_token(*_):
        started.set()

    def run():
        try:
            model.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=200,
                           steps_per_dispatch=1, on_token=on_token)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out["error"], out["at"] = e, time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(600), "generation did not start"
    victim = cluster.workers[1]
    sent = time.monotonic()
    os.kill(victim.pid, sig)
    t.join(HEARTBEAT_TIMEOUT + 300)  # bounded: the driver does not hang (minutes of slack
    assert not t.is_alive(), "the driver hung after a worker fault"  # for a busy machine)
    assert "error" in out, "generation finished although a worker was stopped"
    return out["error"], out["at"] - sent, victim


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_worker_fault_mid_generation_is_a_clear_error_then_restart(ray_session, weights,
                                                                  reference, sig):
    cluster = RayCluster(processes=2, cpu_devices=2, heartbeat_interval=0.5,
                         heartbeat_timeout=HEARTBEAT_TIMEOUT, grace=5).start()
    try:
        err, seconds, victim = fault_mid_generation(cluster, weights, sig)
        print(f"{signal.Signals(sig).name}: {type(err).__name__} after {seconds:.1f} s: {err}")
        assert isinstance(err, WorkerError), repr(err)
        assert victim in err.workers and f"pid {victim.pid}" in str(err)
        assert ("died" if sig == signal.SIGKILL else "heartbeat") in str(err)
        with pytest.raises(WorkerError, match="restart"):  # a failed cluster says what to do
            cluster.call("info")
        cluster.restart()
        assert victim.pid not in [w.pid for w in cluster.workers]
        model = get_model("alpa/opt-tiny", path=weights, plan=Plan(tp=4), cluster=cluster)
        want = reference.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=5)
        np.testing.assert_array_equal(
            model.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=5), want)
    finally:
        pids = [w.pid for w in cluster.workers]
        cluster.shutdown()
    deadline = time.monotonic() + LEAVE_S  # exiting takes a while on a busy machine
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "worker processes left behind"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_weights_must_be_on_every_host(cluster, tmp_path):
    with pytest.raises(WeightError, match="(?s)missing on 2 of 2 hosts.*same path, or a shared"):
        get_model("alpa/opt-tiny", path=tmp_path, cluster=cluster)
    assert cluster.started  # a bad path is not a worker fault
    w = [WorkerInfo(0, "a", "10.0.0.1", 1), WorkerInfo(1, "b", "10.0.0.2", 2)]
    found = {"found": True, "location": "/w/opt-tiny-np", "files": {"x": 4, "y": 8},
             "digests": {"config.json": "ab"}, "config": None}
    assert check_weights([(w[0], found), (w[1], found)], "opt-tiny", "/w") is found
    with pytest.raises(WeightError, match=r"missing on 1 of 2 hosts:\n  worker 1 .*gone"):
        check_weights([(w[0], found), (w[1], {"found": False, "error": "gone"})], "t", "/w")
    other = dict(found, files={"x": 4, "y": 9})
    with pytest.raises(WeightError, match="y: 8 bytes on a, 9 bytes on b"):
        check_weights([(w[0], found), (w[1], other)], "opt-tiny", "/w")
    other = dict(found, digests={"config.json": "cd"})
    with pytest.raises(WeightError, match="config.json: contents differ"):
        check_weights([(w[0], found), (w[1], other)], "opt-tiny", "/w")


def test_versions_must_match_across_hosts(cluster):
    driver = local_versions()
    infos = cluster.call("info")  # what each worker reported at start-up, checked then
    assert all(i["versions"]["optkit source"] == driver["optkit source"] for i in infos)
    check_versions(driver, [(w, i["versions"]) for w, i in zip(cluster.workers, infos,
                                                                   strict=True)])
    w = [WorkerInfo(0, "a", "10.0.0.1", 1), WorkerInfo(1, "b", "10.0.0.2", 2)]
    check_versions(driver, [(w[0], driver), (w[1], driver)])
    old = dict(driver, jax="0.4.30", **{"optkit source": "0123456789ab"})
    with pytest.raises(VersionMismatchError) as e:
        check_versions(driver, [(w[0], driver), (w[1], old)])
    assert e.value.workers == (w[1],)
    assert f"jax 0.4.30 (driver {driver['jax']})" in str(e.value)
    assert "optkit source 0123456789ab" in str(e.value) and "host b" in str(e.value)
