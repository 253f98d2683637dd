"""Synchronous dispatch (multi-process CPU clusters): executor results awaited, no change
to what they compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optkit.parallel import dispatch


@pytest.fixture
def synchronous():
    dispatch.set_synchronous(True)
    yield
    dispatch.set_synchronous(False)


def test_asynchronous_by_default():
    fn = jax.jit(lambda x: x + 1)
    assert not dispatch.synchronous() and dispatch.settled(fn) is fn
    x = jnp.ones(3)
    assert dispatch.settle(x) is x


def test_settled_functions_wait_for_their_results(synchronous, monkeypatch):
    waited = []
    real = jax.block_until_ready
    monkeypatch.setattr(dispatch.jax, "block_until_ready",
                        lambda x: waited.append(x) or real(x))
    fn = dispatch.settled(jax.jit(lambda x: (x * 2, x.sum())))
    a, b = fn(jnp.arange(4.0))
    assert len(waited) == 1 and waited[0][0] is a  # the whole result, once
    np.testing.assert_array_equal(a, [0, 2, 4, 6])
    assert float(b) == 6.0
    assert dispatch.settle(a) is a and len(waited) == 2


def test_executor_jits_are_settled(synchronous, monkeypatch):
    """Executor._once wraps the functions it makes (not the kernels dicts it caches)."""
    from optkit.parallel.executor import Executor

    class Ex(Executor):
        def __init__(self):
            self._fns = {}

    waited = []
    monkeypatch.setattr(dispatch, "settle", lambda x: waited.append(x) or x)
    ex = Ex()
    fn = ex._once("f", lambda: jax.jit(lambda x: x + 1))
    assert ex._once("f", lambda: pytest.fail("made twice")) is fn
    assert float(fn(jnp.float32(1))) == 2.0 and len(waited) == 1
    kernels = ex._once("k", lambda: {"attention": None})
    assert kernels == {"attention": None}
