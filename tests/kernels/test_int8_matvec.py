"""The int8 product kernel (run through Pallas' interpreter) against exact products."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optkit.kernels import int8_matvec as K


def exact(x, q, scale):
    return (np.asarray(x, np.float64) @ np.asarray(q, np.float64).T) * np.asarray(scale)


@pytest.mark.parametrize("rows,n,k,block_n,block_k", [(1, 64, 256, 8, 64), (3, 48, 384, 16, 128),
                                                      (4, 8, 32, 8, 32)])
def test_matches_exact_products(rows, n, k, block_n, block_k):
    rng = np.random.default_rng(rows)
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    q[0, :8] = [-128, -127, -1, 0, 1, 127, -2, 2]  # every byte position, both extremes
    x = rng.standard_normal((rows, k)).astype(np.float32)
    s = rng.uniform(0.001, 0.01, n).astype(np.float32)
    got = K.int8_matvec(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), block_n=block_n,
                        block_k=block_k, interpret=True)
    assert got.shape == (rows, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), exact(x, q, s), rtol=1e-5, atol=1e-5)


def test_one_weight_at_a_time():
    """A single nonzero weight lands on its own (row, column): no byte is misplaced."""
    for col in range(8):
        q = np.zeros((8, 32), np.int8)
        q[3, col] = -100
        x = np.zeros((1, 32), np.float32)
        x[0, col] = 2.0
        got = np.asarray(K.int8_matvec(jnp.asarray(x), jnp.asarray(q), jnp.ones(8),
                                       block_n=8, block_k=32, interpret=True))
        want = np.zeros((1, 8))
        want[0, 3] = -200.0
        np.testing.assert_array_equal(got, want)


def test_half_precision_inputs_and_default_blocks():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (24, 1024)).astype(np.int8)
    x = rng.standard_normal((1, 1024)).astype(np.float16)
    got = K.int8_matvec(jnp.asarray(x), jnp.asarray(q), jnp.full(24, 0.01), interpret=True)
    np.testing.assert_allclose(np.asarray(got), exact(x, q, np.full(24, 0.01)), rtol=1e-5,
                               atol=1e-4)
    assert K.blocks(24, 1024) == (4, 1024, 4) and K.blocks(6, 48)[:2] == (2, 16)
    assert K.blocks(18432, 12288) == (8, 2048, 4) and K.blocks(4096, 4096)[:2] == (4, 1024)
    assert K.blocks(8, 40)[1] == 0  # no block tiles 40 weights


@pytest.mark.parametrize("relu", [False, True])
def test_bias_relu_and_output_dtype(relu):
    rng = np.random.default_rng(5)
    q = rng.integers(-128, 128, (16, 128)).astype(np.int8)
    x = rng.standard_normal((2, 128)).astype(np.float16)
    s = np.full(16, 0.01, np.float32)
    b = rng.standard_normal(16).astype(np.float16)
    got = K.int8_matvec(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), jnp.asarray(b),
                        relu=relu, out_dtype=jnp.float16, block_n=8, block_k=64,
                        interpret=True)
    want = exact(x, q, s) + b.astype(np.float64)
    want = np.maximum(want, 0) if relu else want
    assert got.dtype == jnp.float16 and (np.asarray(got) < 0).any() != relu
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-3, atol=2e-3)


def test_bad_shapes():
    q = jnp.zeros((8, 64), jnp.int8)
    with pytest.raises(ValueError, match="int8_matvec"):
        K.int8_matvec(jnp.zeros((1, 32)), q, jnp.ones(8), interpret=True)
    with pytest.raises(ValueError, match="int8_matvec"):
        K.int8_matvec(jnp.zeros((1, 64)), q.astype(jnp.int16), jnp.ones(8), interpret=True)
    with pytest.raises(ValueError, match="bias"):
        K.int8_matvec(jnp.zeros((1, 64)), q, jnp.ones(8), jnp.ones(4), interpret=True)
    with pytest.raises(ValueError, match="do not tile"):
        K.int8_matvec(jnp.zeros((1, 64)), q, jnp.ones(8), block_k=48, interpret=True)


def test_lowers_for_gpus_with_each_weight_eviction_policy():
    """The Triton lowering (run here without a GPU) takes the weight loads' eviction policy;
    an unknown one is refused."""
    x = jax.ShapeDtypeStruct((1, 2048), jnp.float16)
    q = jax.ShapeDtypeStruct((64, 2048), jnp.int8)
    s = jax.ShapeDtypeStruct((64,), jnp.float32)

    def lower(evict):
        fn = jax.jit(functools.partial(K.int8_matvec, evict=evict))
        return fn.trace(x, q, s).lower(lowering_platforms=("cuda",)).as_text()

    texts = {evict: lower(evict) for evict in (None, "evict_first")}
    assert all("int8_matvec" in t for t in texts.values())
    assert texts[None] != texts["evict_first"]  # the policy reaches the kernel
    with pytest.raises(ValueError, match="eviction policy"):
        lower("evict_sometimes")
