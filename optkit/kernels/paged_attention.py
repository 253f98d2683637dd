"""Decode attention through block tables on GPUs: a Pallas (Triton) kernel for OPT's heads.

``model.paged_forward`` takes a ``decode_attention(q, k_pool, v_pool, tables, lengths)`` hook
for its one-token rows; this module provides it.  Each program of the kernel takes one head
of one row and one split of its block table: it walks the split's blocks up to the row's
length, a few blocks a step, with an online softmax (instead of gathering the blocks into a
contiguous copy first, XLA's path), and writes its partial output, maximum and sum; a
last XLA step merges the splits.  OPT has as many K/V heads as query heads, so a head's
query is one vector: the products are elementwise multiply-and-sum, with no padding of
the query to a matrix (JAX's own Pallas paged-attention op pads each query head to 16
rows for its tensor-core products, and writes 16 partial outputs per split).
Pools are (A, blocks, block_size, D).

``interpret=True`` runs it through Pallas' interpreter (CPU tests).  Where a JAX lacks
Pallas' Triton backend, importing this module fails and the engine keeps XLA's path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = float(jnp.finfo(jnp.float32).min)


def supported(head_dim: int, block_size: int) -> bool:
    """Whether the kernel handles these shapes (Triton blocks want powers of two)."""
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_size >= 16
            and block_size & (block_size - 1) == 0)


def splits(num_blocks: int, block_size: int) -> tuple[int, int]:
    """(splits of a row's table, blocks a step) for tables of ``num_blocks`` (a power of
    two) blocks: 256 positions a split (at most 8 splits), 64 positions a step -- within
    3% of the fastest setting timed on an H200 for lengths of 32-2,000 tokens
    (``benchmarks/results/paged_attention_ops_h200.json``)."""
    positions = num_blocks * block_size
    k_splits = max(1, min(8, positions // 256, num_blocks))
    return k_splits, max(1, min(num_blocks // k_splits, 64 // block_size))


def _kernel(tables_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, s_ref, *,
            per_step: int, per_split: int):
    """One (row, head, split): o = sum_j p_j v_j, m = max logit, s = sum_j p_j with
    p_j = exp(logit_j - m) over the split's positions below the row's length."""
    split = pl.program_id(2)
    bs, d = k_ref.shape[-2], k_ref.shape[-1]
    width = per_step * bs
    length = lengths_ref[0]
    start = split * per_split * bs
    q = q_ref[...].astype(jnp.float32)

    def body(i, carry):
        o, m, total = carry
        blocks = tables_ref[pl.ds(split * per_split + i * per_step, per_step)]
        k = k_ref[blocks].reshape(width, d).astype(jnp.float32)
        v = v_ref[blocks].reshape(width, d).astype(jnp.float32)
        logits = jnp.sum(k * q[None, :], axis=1)
        logits = jnp.where(start + i * width + jnp.arange(width) < length, logits, _NEG)
        m_new = jnp.maximum(m, jnp.max(logits))
        p = jnp.exp(logits - m_new)
        fix = jnp.exp(m - m_new)
        return o * fix + jnp.sum(p[:, None] * v, axis=0), m_new, total * fix + jnp.sum(p)

    todo = jnp.clip(length - start, 0, per_split * bs)
    o, m, total = lax.fori_loop(0, pl.cdiv(todo, width), body,
                            (jnp.zeros((d,), jnp.float32), jnp.float32(_NEG),
                             jnp.float32(0.0)))
    o_ref[...] = o
    m_ref[...] = jnp.full((1,), m, jnp.float32)
    s_ref[...] = jnp.full((1,), total, jnp.float32)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "setting"))
def paged_decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                           tables: jax.Array, lengths: jax.Array, *, scale: float,
                           interpret: bool = False,
                           setting: tuple[int, int, int] | None = None) -> jax.Array:
    """q (R, A, D) attends over the first ``lengths`` (R,) positions (>= 1) of each row's
    blocks ``tables`` (R, NB) in the pools (A, blocks, block_size, D) -> (R, A, D).
    ``setting``: (splits, blocks a step, warps) instead of :func:`splits`' and 2 warps
    (the splits must divide NB, the blocks a step a split's blocks)."""
    r, a, d = q.shape
    _, pool_blocks, bs, _ = k_pool.shape
    nb = tables.shape[1]
    k_splits, per_step, warps = setting or (*splits(nb, bs), 2)
    per_split = nb // k_splits
    if nb % k_splits or per_split % per_step:
        raise ValueError(f"setting {setting}: {k_splits} splits of {nb} blocks, "
                         f"{per_step} a step")
    head = pl.BlockSpec((None, pool_blocks, bs, d), lambda i, h, s: (h, 0, 0, 0))
    part = pl.BlockSpec((None, None, None, 1), lambda i, h, s: (s, i, h, 0))
    o, m, total = pl.pallas_call(
        functools.partial(_kernel, per_step=per_step, per_split=per_split),
        grid=(r, a, k_splits),
        in_specs=[pl.BlockSpec((None, nb), lambda i, h, s: (i, 0)),
                  pl.BlockSpec((None, 1), lambda i, h, s: (i, 0)),
                  pl.BlockSpec((None, None, d), lambda i, h, s: (i, h, 0)),
                  head, head],
        out_specs=[pl.BlockSpec((None, None, None, d), lambda i, h, s: (s, i, h, 0)),
                   part, part],
        out_shape=[jax.ShapeDtypeStruct((k_splits, r, a, d), jnp.float32),
                   jax.ShapeDtypeStruct((k_splits, r, a, 1), jnp.float32),
                   jax.ShapeDtypeStruct((k_splits, r, a, 1), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret, name="optkit_paged_decode_attention",
    )(tables.astype(jnp.int32), lengths.astype(jnp.int32)[:, None],
      (q.astype(jnp.float32) * scale).astype(q.dtype), k_pool, v_pool)
    weight = jnp.exp(m - m.max(0))  # splits past a row's length: m = min, total = 0
    return ((o * weight).sum(0) / (total * weight).sum(0)).astype(q.dtype)
