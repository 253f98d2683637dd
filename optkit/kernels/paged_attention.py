"""Decode attention through block tables on GPUs: JAX's Pallas paged-attention op.

``model.paged_forward`` takes a ``decode_attention(q, k_pool, v_pool, tables, lengths)`` hook
for its one-token rows; this module provides it with
``jax.experimental.pallas.ops.gpu.paged_attention`` (Pallas on Triton), which walks each
row's blocks up to its length with an online softmax instead of gathering them into a
contiguous copy first (XLA's path).  Pools are (A, blocks, block_size, D), the op's layout.
The op splits each row's blocks over ``k_splits`` programs of ``pages_per_compute_block``
blocks a step; both are chosen from the number of blocks read and their size.

``interpret=True`` runs it through Pallas' interpreter (CPU tests).  Where a JAX lacks
Pallas' Triton backend, importing this module fails and the engine keeps XLA's path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as _paged_op


def supported(head_dim: int, block_size: int) -> bool:
    """Whether the op handles these shapes (Triton dots want powers of two >= 16)."""
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_size >= 16
            and block_size & (block_size - 1) == 0)


def splits(num_blocks: int, block_size: int) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block) for rows reading ``num_blocks`` (a power of
    two) blocks: 128 positions a step, up to 4 programs a row, 4 warps (with 16-token
    blocks within 3% of the fastest setting measured on an H200 at 256 and 1,024
    positions: ``benchmarks/results/paged_attention_ops_h200.json``)."""
    per_step = max(1, min(num_blocks, 128 // block_size))
    return min(4, num_blocks // per_step), per_step


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def paged_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                           tables: jax.Array, lengths: jax.Array, *, scale: float,
                           interpret: bool = False) -> jax.Array:
    """q (R, A, D) attends over the first ``lengths`` (R,) positions of each row's blocks
    ``tables`` (R, NB) in the pools (A, blocks, block_size, D) -> (R, A, D)."""
    k_splits, per_step = splits(tables.shape[1], k_pool.shape[-2])
    out = _paged_op((q.astype(jnp.float32) * scale).astype(q.dtype), k_pool, v_pool,
                    tables.astype(jnp.int32), lengths.astype(jnp.int32),
                    pages_per_compute_block=per_step, k_splits=k_splits, num_warps=4,
                    interpret=interpret)
    return out.astype(q.dtype)
