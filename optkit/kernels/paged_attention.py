"""Attention through block tables on GPUs: Pallas (Triton) kernels for OPT's heads.

``model.paged_forward`` takes hooks for its one-token rows (``decode_attention(q, k_pool,
v_pool, tables, lengths)``) and for its prompt-chunk rows (``chunk_attention(q, k_pool,
v_pool, tables, q_index)``); this module provides both.  Neither gathers a row's blocks
into a contiguous copy first (XLA's path, ``model.paged_attention``): each program walks
its blocks through the table, a few blocks a step, with an online softmax.

* :func:`paged_decode_attention`: one program per head of a row and split of its table;
  blocks read up to the row's length; a last XLA step merges the splits.  OPT has as many
  K/V heads as query heads, so a head's query is one vector: the products are elementwise
  multiply-and-sum, with no padding of the query to a matrix (JAX's own Pallas
  paged-attention op pads each query head to 16 rows for its tensor-core products, and
  writes 16 partial outputs per split).
* :func:`paged_chunk_attention`: one program per head of a row of T prompt tokens;
  blocks read up to the row's last position; tensor-core products (T x blocks).

Pools are (A, blocks, block_size, D).  ``interpret=True`` runs them through Pallas'
interpreter (CPU tests).  Where a JAX lacks Pallas' Triton backend, importing this module
fails and the engine keeps XLA's path.
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
    """Whether the kernels handle these shapes (Triton blocks want powers of two)."""
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


#: Blocks a step and warps of :func:`paged_chunk_attention`: the fastest of 2/4/8 blocks
#: and 4/8 warps timed on an H200 for the engine's rows of 64 tokens holding one 2,048-token
#: prompt or eight of 256 (``benchmarks/results/paged_chunk_attention_ops_h200.json``).
CHUNK_SETTING = (4, 4)
#: Most queries one program of :func:`paged_chunk_attention` takes (longer rows are split:
#: a program holds its queries and their partial outputs in registers).
CHUNK_ROWS = 64


def _chunk_kernel(tables_ref, q_index_ref, q_ref, k_ref, v_ref, o_ref, *, per_step: int):
    """One (row, head): the row's T queries over its blocks up to its last position."""
    bs, d = k_ref.shape[-2], k_ref.shape[-1]
    width = per_step * bs
    q_index = q_index_ref[...]  # (T,) each query's position
    q = q_ref[...]              # (T, D), scaled

    def body(i, carry):
        acc, m, total = carry
        blocks = tables_ref[pl.ds(i * per_step, per_step)]
        k = k_ref[blocks].reshape(width, d)
        v = v_ref[blocks].reshape(width, d)
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32)  # (T, width)
        pos = i * width + jnp.arange(width)
        logits = jnp.where(pos[None, :] <= q_index[:, None], logits, _NEG)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        p = jnp.exp(logits - m_new[:, None])
        fix = jnp.exp(m - m_new)
        acc = acc * fix[:, None] + jnp.dot(p.astype(v.dtype), v,
                                           preferred_element_type=jnp.float32)
        return acc, m_new, total * fix + jnp.sum(p, axis=1)

    t = q.shape[0]
    init = (jnp.zeros((t, d), jnp.float32), jnp.full((t,), _NEG, jnp.float32),
            jnp.zeros((t,), jnp.float32))
    acc, _, total = lax.fori_loop(0, pl.cdiv(jnp.max(q_index) + 1, width), body, init)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "setting"))
def paged_chunk_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                          tables: jax.Array, q_index: jax.Array, *, scale: float,
                          interpret: bool = False,
                          setting: tuple[int, int] | None = None) -> jax.Array:
    """Causal attention of prompt-chunk rows: q (R, T, A, D), each query
    attending positions [0, q_index] (R, T) of its row's blocks ``tables`` (R, NB) in the
    pools (A, blocks, block_size, D) -> (R, T, A, D), as ``model.paged_attention``.
    ``setting``: (blocks a step, warps) instead of :data:`CHUNK_SETTING`."""
    r, t, a, d = q.shape
    rows = min(max(t, 16), CHUNK_ROWS)  # queries a program takes
    if t != rows:  # pad to whole programs (>= 16 for the tensor cores), split long rows
        n = -(-t // rows)
        pad = ((0, 0), (0, n * rows - t))
        q = jnp.pad(q, pad + ((0, 0), (0, 0))).reshape(r * n, rows, a, d)
        out = paged_chunk_attention(q, k_pool, v_pool, jnp.repeat(tables, n, axis=0),
                                    jnp.pad(q_index, pad).reshape(r * n, rows), scale=scale,
                                    interpret=interpret, setting=setting)
        return out.reshape(r, n * rows, a, d)[:, :t]
    _, pool_blocks, bs, _ = k_pool.shape
    per_step, warps = setting or CHUNK_SETTING
    per_step = min(per_step, tables.shape[1])
    # every step reads whole steps of blocks: pad the table (positions past a row's last
    # query are masked, so the padding blocks' contents never count)
    tables = jnp.pad(tables.astype(jnp.int32), ((0, 0), (0, -tables.shape[1] % per_step)))
    head = pl.BlockSpec((None, pool_blocks, bs, d), lambda i, h: (h, 0, 0, 0))
    row = pl.BlockSpec((None, t, None, d), lambda i, h: (i, 0, h, 0))
    return pl.pallas_call(
        functools.partial(_chunk_kernel, per_step=per_step),
        grid=(r, a),
        in_specs=[pl.BlockSpec((None, tables.shape[1]), lambda i, h: (i, 0)),
                  pl.BlockSpec((None, t), lambda i, h: (i, 0)),
                  row, head, head],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct((r, t, a, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret, name="optkit_paged_chunk_attention",
    )(tables, q_index.astype(jnp.int32), (q.astype(jnp.float32) * scale).astype(q.dtype),
      k_pool, v_pool)
