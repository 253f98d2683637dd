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
