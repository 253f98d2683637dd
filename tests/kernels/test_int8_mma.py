"""The tensor-core int8 product kernel (run through Pallas' interpreter) against exact
products; its block plan; its GPU lowering (run here without a GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optkit.kernels import int8_mma as K


def exact(x, q, scale, bias=None, relu=False):
    y = (np.asarray(x, np.float64) @ np.asarray(q, np.float64).T) * np.asarray(scale)
    y = y if bias is None else y + np.asarray(bias, np.float64)
    return np.maximum(y, 0) if relu else y


@pytest.mark.parametrize("rows,n,k,block_n,block_k,split", [
    (1, 128, 512, 64, 256, 1), (3, 64, 1024, 64, 256, 2), (16, 64, 256, 64, 64, 4),
    (33, 64, 512, 64, 256, 1), (64, 128, 256, 64, 128, 2)])
def test_matches_exact_products(rows, n, k, block_n, block_k, split):
    rng = np.random.default_rng(rows)
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    q[0, :6] = [-128, -127, -1, 0, 1, 127]
    x = rng.standard_normal((rows, k)).astype(np.float16)
    s = rng.uniform(0.001, 0.01, n).astype(np.float32)
    got = K.int8_mma(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), block_n=block_n,
                     block_k=block_k, split=split, interpret=True)
    assert got.shape == (rows, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), exact(x, q, s), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("relu", [False, True])
def test_bias_relu_and_output_dtype(split, relu):
    """In the kernel (one part of K) or after the partial sums are added (two)."""
    rng = np.random.default_rng(5)
    q = rng.integers(-128, 128, (64, 512)).astype(np.int8)
    x = rng.standard_normal((2, 512)).astype(np.float16)
    s = np.full(64, 0.01, np.float32)
    b = rng.standard_normal(64).astype(np.float16)
    got = K.int8_mma(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), jnp.asarray(b),
                     relu=relu, out_dtype=jnp.float16, block_n=64, block_k=256, split=split,
                     interpret=True)
    assert got.dtype == jnp.float16 and (np.asarray(got) < 0).any() != relu
    np.testing.assert_allclose(np.asarray(got, np.float64), exact(x, q, s, b, relu),
                               rtol=2e-3, atol=2e-3)


def test_plan_splits_kernels_with_few_channel_blocks():
    """OPT-175B's shards on two cards: qkv and fc1 whole, out and fc2 in two parts of K;
    small kernels none."""
    assert K.plan(3 * 12288 // 2, 12288) == (64, 256, 1)
    assert K.plan(49152 // 2, 12288) == (64, 256, 1)
    assert K.plan(12288, 6144) == (64, 256, 2) and K.plan(12288, 24576) == (64, 256, 2)
    # opt-6.7b's kernels stay on the CUDA-core kernel for one row (no faster there), not
    # for several (XLA's dot the other way); up to 64 rows
    small = ((12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384))
    assert all(K.plan(n, k) is None for n, k in small)
    assert [K.plan(n, k, 16) for n, k in small] == [(64, 256, 2), (64, 256, 2), (64, 256, 1),
                                                     (64, 256, 2)]
    assert K.plan(4096, 4096, K.LARGEST) == (64, 256, 2) and K.plan(4096, 4096, 65) is None
    assert K.plan(8192 + 32, 6144) is None and K.plan(8192, 6144 + 128, 2) is None  # no tiling
    assert [K.row_tile(m) for m in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]


def test_bad_inputs():
    q = jnp.zeros((64, 256), jnp.int8)
    with pytest.raises(ValueError, match="int8_mma"):
        K.int8_mma(jnp.zeros((1, 256), jnp.bfloat16), q, jnp.ones(64), interpret=True)
    with pytest.raises(ValueError, match="int8_mma"):
        K.int8_mma(jnp.zeros((65, 256), jnp.float16), q, jnp.ones(64), interpret=True)
    with pytest.raises(ValueError, match="bias"):
        K.int8_mma(jnp.zeros((1, 256), jnp.float16), q, jnp.ones(64), jnp.ones(8),
                   interpret=True)
    with pytest.raises(ValueError, match="do not tile"):
        K.int8_mma(jnp.zeros((1, 256), jnp.float16), q, jnp.ones(64), interpret=True)
    with pytest.raises(ValueError, match="do not tile"):
        K.int8_mma(jnp.zeros((1, 256), jnp.float16), q, jnp.ones(64), block_n=64,
                   block_k=256, split=2, interpret=True)


@pytest.mark.parametrize("evict", [None, "evict_first"])
def test_lowers_for_gpus_with_the_ptx_widening(evict):
    """The Triton lowering takes the inline PTX and both weight-load policies."""
    x = jax.ShapeDtypeStruct((1, 1024), jnp.float16)
    q = jax.ShapeDtypeStruct((128, 1024), jnp.int8)
    s = jax.ShapeDtypeStruct((128,), jnp.float32)
    fn = jax.jit(functools.partial(K.int8_mma, block_n=64, block_k=256, split=2, evict=evict))
    text = fn.trace(x, q, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "int8_mma" in text and "prmt.b32" in text
    # 40 rows: a 64-row tile, its rows past 40 masked on load and store
    text = fn.trace(jax.ShapeDtypeStruct((40, 1024), jnp.float16), q, s).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "int8_mma" in text
