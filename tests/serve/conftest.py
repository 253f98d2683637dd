"""Serving fixtures: fake-engine servers (fast, hand-checkable) and one tiny random model."""

import pytest

from optkit.serve import (
    BackgroundServer,
    CharCodec,
    FakeEngine,
    Limits,
    Metrics,
    SamplingParams,
    Scheduler,
    SeqRequest,
    create_app,
    make_engine,
)


@pytest.fixture
def fake_server():
    """Factory: start a fake-engine server -> (server, scheduler, engine); stopped after."""
    servers = []

    def make(max_slots=4, step_delay=0.0, prefill_delay=0.0, limits=None, api_keys=None,
             steps_per_dispatch=4, max_len=256, max_n=16, shutdown_timeout=30.0):
        engine = FakeEngine(max_slots=max_slots, max_len=max_len, step_delay=step_delay,
                            prefill_delay=prefill_delay)
        sched = Scheduler(engine, CharCodec(), limits or Limits(max_queue=64),
                          weights=api_keys, steps_per_dispatch=steps_per_dispatch,
                          metrics=Metrics())
        srv = BackgroundServer(create_app(sched, sched.codec, "fake", api_keys=api_keys,
                                          max_n=max_n),
                               shutdown_timeout=shutdown_timeout).start()
        servers.append(srv)
        return srv, sched, engine

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def tiny_model(tiny_weights):
    """OPT-tiny on one device, loaded from the folder (much faster here than
    ``dummy=True``, which compiles once per tensor shape)."""
    from optkit import get_model

    return get_model("jax/opt-tiny", path=tiny_weights, progress=False)


def wait_until(cond, timeout=300.0, interval=0.01):
    """Poll ``cond`` until it holds.  ``timeout`` only bounds a hang: it is minutes, so a
    machine several times slower than usual (other jobs on its cores) still passes."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def gated(scheduler):
    """Make ``scheduler``'s engine wait for the returned (cleared) event before each step."""
    import threading

    go, step = threading.Event(), scheduler.engine.step

    def wait_then_step(works, num_steps=1):
        assert go.wait(120), "the test never let the engine step"
        return step(works, num_steps)

    scheduler.engine.step = wait_then_step
    return go


#: Prompts (token ids) of :func:`scheduler_outputs`.
SCHEDULER_PROMPTS = [(2, 100, 200, 300), (2, 7), (2, 5000, 6000, 7000, 8000, 9000, 11, 12, 13)]


#: Engine sizes of the model tests (the same shapes everywhere: compiled once per session).
ENGINE = dict(max_num_seqs=8, max_len=128, max_batched_tokens=64, block_size=16,
              num_blocks=65)


def scheduler_outputs(executor, slots=8, max_len=128, new_tokens=7):
    """Token ids and cumulative log-probs of the server's scheduler thread over ``executor``
    (greedy and sampled rows, log-probs on some): what backends must reproduce."""
    # CharCodec only decodes text here; the token ids are what gets compared
    engine = make_engine(executor, **{**ENGINE, "max_num_seqs": slots, "max_len": max_len})
    s = Scheduler(engine, CharCodec(), Limits()).start()
    try:
        hs = s.submit([SeqRequest(p, new_tokens,
                                  SamplingParams(temperature=0.8 * (i % 2), seed=i),
                                  ignore_eos=True, logprobs=2 * (i % 2) or None)
                       for i, p in enumerate(SCHEDULER_PROMPTS)])
        wait_until(lambda: all(h.done for h in hs))
        return [h.stream.ids for h in hs], [h.cum_logprob for h in hs]
    finally:
        s.stop()
