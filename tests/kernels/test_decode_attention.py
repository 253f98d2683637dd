"""The fused decode-attention kernel (run through Pallas' interpreter) against the model's
XLA path: same output, same cache writes, only each row's own positions read."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optkit import model as M
from optkit.kernels import decode_attention as K


def inputs(b=3, s=40, a=2, d=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.standard_normal((b, 3, a, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, s, a, d)), dtype) for _ in range(2))
    return qkv, k, v


@pytest.mark.parametrize("block_k,heads", [(16, 1), (32, 1), (8, 2), (16, 4)])
def test_matches_dense_with_left_padding(block_k, heads):
    """Rows at the end, middle and start of the cache; pads longer than a block, so some
    lanes see only masked positions before their first real one."""
    qkv, k, v = inputs(a=4)
    index = jnp.asarray([39, 17, 0], jnp.int32)
    pads = jnp.asarray([3, 11, 0])
    pos = jnp.arange(40)[None]
    mask = (pos <= index[:, None]) & (pos >= pads[:, None])
    got = K.decode_attention(qkv, k, v, K.mask_bias(mask), index, scale=0.25,
                             block_k=block_k, heads=heads, interpret=True)
    ref = M.dense_decode_attention(qkv, k, v, mask, index, 40, 0.25)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-6)


def test_reads_nothing_past_the_index():
    """Garbage (NaN) beyond each row's index must not reach the output."""
    qkv, k, v = inputs(b=2, s=64)
    index = jnp.asarray([20, 45], jnp.int32)
    pos = jnp.arange(64)[None]
    stale = pos > index[:, None]
    k_bad = jnp.where(stale[..., None, None], jnp.nan, k)
    v_bad = jnp.where(stale[..., None, None], jnp.nan, v)
    mask = pos <= index[:, None]
    out, k_new, _ = K.decode_attention(qkv, k_bad, v_bad, K.mask_bias(mask), index,
                                       scale=0.25, block_k=16, interpret=True)
    ref = M.dense_decode_attention(qkv, k, v, mask, index, 64, 0.25)[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(k_new[0, 20]), np.asarray(qkv[0, 1]))


def test_half_precision_cache():
    qkv, k, v = inputs(dtype=jnp.float16)
    index = jnp.asarray([30, 2, 9], jnp.int32)
    mask = jnp.arange(40)[None] <= index[:, None]
    out, _, _ = K.decode_attention(qkv, k, v, K.mask_bias(mask), index, scale=0.25,
                                   interpret=True)
    ref = M.dense_decode_attention(qkv, k, v, mask, index, 40, 0.25)[0]
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=2e-3)


def test_rejects_unsupported_shapes():
    assert not K.supported(80) and K.supported(64)
    qkv, k, v = inputs(d=16)
    with pytest.raises(ValueError, match="power-of-two"):
        K.decode_attention(qkv[..., :12], k[..., :12], v[..., :12],
                           jnp.zeros((3, 40)), jnp.zeros(3, jnp.int32), scale=1.0,
                           interpret=True)
    with pytest.raises(ValueError, match="shapes"):
        K.decode_attention(qkv[:2], k, v, jnp.zeros((3, 40)), jnp.zeros(3, jnp.int32),
                           scale=1.0, interpret=True)


def test_block_choice_follows_the_grid():
    assert K.blocks(1, 32, 128) == (128, 1, 8)     # batch 1: long blocks, many warps
    assert K.blocks(16, 32, 64) == (64, 1, 4)
    assert K.blocks(64, 32, 64) == (16, 2, 4)      # two heads a program at large batches
    assert K.blocks(64, 5, 128)[1] == 1            # ... where the heads pair up


def test_heads_a_program_must_divide_the_heads():
    qkv, k, v = inputs(a=4)
    index = jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match="heads=3"):
        K.decode_attention(qkv, k, v, jnp.zeros((3, 40)), index, scale=1.0, heads=3,
                           interpret=True)


def test_lowers_for_gpus_with_heads_grouped():
    """The Triton lowering (run here without a GPU) takes 3-D blocks of two heads."""
    sd = jax.ShapeDtypeStruct
    cache = sd((64, 256, 32, 64), jnp.float16)
    fn = jax.jit(functools.partial(K.decode_attention, scale=0.125, block_k=16, heads=2))
    text = fn.trace(sd((64, 3, 32, 64), jnp.float16), cache, cache,
                    sd((64, 256), jnp.float32), sd((64,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "decode_attention" in text
