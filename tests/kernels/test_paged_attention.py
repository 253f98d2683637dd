"""The paged decode-attention kernel (through Pallas' interpreter) against XLA's path."""

import jax.numpy as jnp
import numpy as np
import pytest

from optkit import model as M

kernel = pytest.importorskip("optkit.kernels.paged_attention")


@pytest.mark.parametrize("heads,dim,block,pool,table", [
    (4, 32, 16, 40, 16),    # one split
    (2, 16, 32, 20, 8),     # larger blocks
    (2, 16, 16, 200, 128),  # 8 splits, rows ending in different splits
])
def test_matches_xla_paged_attention(heads, dim, block, pool, table):
    rng = np.random.default_rng(0)
    rows = 5
    q = jnp.asarray(rng.normal(size=(rows, heads, dim)), jnp.float16)
    k = jnp.asarray(rng.normal(size=(heads, pool, block, dim)), jnp.float16)
    v = jnp.asarray(rng.normal(size=(heads, pool, block, dim)), jnp.float16)
    tables = jnp.asarray(rng.integers(1, pool, (rows, table)), jnp.int32)
    lengths = np.r_[1, table * block, rng.integers(1, table * block + 1, rows - 2)]
    want = M.paged_attention(q[:, None], k, v, tables, jnp.asarray(lengths - 1)[:, None],
                             dim ** -0.5)[:, 0]
    got = kernel.paged_decode_attention(q, k, v, tables, jnp.asarray(lengths, jnp.int32),
                                        scale=dim ** -0.5, interpret=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-3)


def test_splits():
    assert kernel.splits(128, 16) == (8, 4)  # the engine's static tables (2,048 positions)
    assert kernel.splits(4, 16) == (1, 4)
    assert kernel.splits(16, 32) == (2, 2)
    assert not kernel.supported(128, 8) and kernel.supported(128, 16)


@pytest.mark.parametrize("rows,t,heads,dim,block,table,setting", [
    (3, 16, 2, 16, 16, 8, None),     # rows starting at 0, mid-table and near its end
    (2, 8, 2, 16, 32, 4, (2, 4)),    # fewer than 16 queries (padded), larger blocks
    (2, 16, 4, 32, 16, 6, (4, 4)),   # a table that is not a whole number of steps
    (2, 100, 2, 16, 16, 10, None),   # rows longer than a program takes (split, padded)
])
def test_chunk_kernel_matches_xla_paged_attention(rows, t, heads, dim, block, table, setting):
    """Prompt-chunk rows: each query attends its row's positions up to its own, padding
    queries (index 0) included."""
    rng = np.random.default_rng(1)
    pool = 3 * table + 1
    q = jnp.asarray(rng.normal(size=(rows, t, heads, dim)), jnp.float16)
    k = jnp.asarray(rng.normal(size=(heads, pool, block, dim)), jnp.float16)
    v = jnp.asarray(rng.normal(size=(heads, pool, block, dim)), jnp.float16)
    tables = jnp.asarray(rng.permutation(np.arange(1, pool))[:rows * table]
                         .reshape(rows, table), jnp.int32)
    starts = rng.integers(0, table * block - t + 1, rows)
    starts[0] = 0
    q_index = starts[:, None] + np.arange(t)[None]
    q_index[-1, t // 2:] = 0  # a row that ends early: the rest is padding
    q_index = jnp.asarray(q_index, jnp.int32)
    want = M.paged_attention(q, k, v, tables, q_index, dim ** -0.5)
    got = kernel.paged_chunk_attention(q, k, v, tables, q_index, scale=dim ** -0.5,
                                       interpret=True, setting=setting)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=3e-3)
