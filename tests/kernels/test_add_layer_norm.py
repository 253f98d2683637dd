"""The fused residual add + LayerNorm kernel (run through Pallas' interpreter) against
numpy in float64; its shape checks; its GPU lowering (run here without a GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optkit.kernels import add_layer_norm as K


def exact(x, y, bias, scale, shift, eps):
    h = np.asarray(x, np.float64) + np.asarray(y, np.float64) + np.asarray(bias, np.float64)
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return h, (h - mean) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + shift


@pytest.mark.parametrize("rows,width", [(1, 64), (3, 80), (2, 640)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("one_pass", [True, False])
def test_matches_numpy(rows, width, dtype, one_pass):
    """Widths that are not powers of two leave masked lanes in the block."""
    rng = np.random.default_rng(width)
    x, y = (rng.standard_normal((rows, width)).astype(dtype) * 3 + 1 for _ in range(2))
    bias, scale, shift = (rng.standard_normal(width).astype(dtype) for _ in range(3))
    h, out = K.add_layer_norm(*map(jnp.asarray, (x, y, bias, scale, shift)), eps=1e-5,
                              one_pass=one_pass, interpret=True)
    assert h.dtype == out.dtype == dtype and h.shape == out.shape == (rows, width)
    want_h, want = exact(x, y, bias, scale, shift, 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(h, np.float64), want_h, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=5 * tol)


def test_rejects_mismatched_shapes():
    x = jnp.zeros((2, 64))
    with pytest.raises(ValueError, match="add_layer_norm"):
        K.add_layer_norm(x, jnp.zeros((2, 32)), *(jnp.zeros(64),) * 3, eps=1e-5,
                         interpret=True)
    with pytest.raises(ValueError, match="add_layer_norm"):
        K.add_layer_norm(x, x, jnp.zeros(64), jnp.zeros(63), jnp.zeros(64), eps=1e-5,
                         interpret=True)


def test_warps_grow_with_the_row():
    assert [K.num_warps(w) for w in (768, 2048, 4096, 5120, 12288)] == [4, 4, 8, 8, 16]


def test_lowers_for_gpus():
    """The Triton lowering (run here without a GPU) takes masked loads and stores."""
    sd = jax.ShapeDtypeStruct
    fn = jax.jit(functools.partial(K.add_layer_norm, eps=1e-5))
    x, v = sd((4, 5120), jnp.float16), sd((5120,), jnp.float16)
    text = fn.trace(x, x, v, v, v).lower(lowering_platforms=("cuda",)).as_text()
    assert "add_layer_norm" in text
