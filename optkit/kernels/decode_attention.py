"""Decode attention and the cache write as one fused GPU kernel (Pallas on Triton).

One new position per row: its packed ``qkv`` (B, 3, A, D) writes K and V into the cache
(B, S, A, D) at the row's ``index`` and its query attends over the row's positions up to
and including that one.  XLA runs this as two scatters and four attention kernels per layer
that read the cache up to a static length; this kernel does it in one pass with an online
softmax and stops at each row's own index, so it reads only the positions written so far.
The caches are aliased to the outputs: they are updated in place.

A program handles one row and one or more heads: it stores the new K/V rows, walks the older
positions in blocks of ``block_k``, then adds the new position from registers.  Each of a
block's ``block_k`` lanes keeps its own running max, sum of exponentials and weighted sum of
values, so a step reduces only over the head size (q . k) and never across the block; the
lanes are combined once at the end (timings: ``benchmarks/README.md``, 'Decode
attention').  ``bias`` (B, S) float32 is 0 where a position may be attended and ``MASKED``
where not (left padding), built from the step's cache mask (the same for every layer).

``interpret=True`` runs the same kernel through Pallas' interpreter (CPU tests).  JAX 0.11
deprecates Pallas' Triton backend; where a JAX no longer has it, importing this module fails
and ``optkit.parallel.kernels`` falls back to XLA's kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

#: additive bias of a position that may not be attended (finite: no inf - inf in the kernel)
MASKED = -1e30


def supported(head_dim: int) -> bool:
    """Whether the kernel handles this head size (Triton blocks need powers of two)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def mask_bias(mask: jax.Array) -> jax.Array:
    """(B, S) bool -> the kernel's additive bias (B, S) float32."""
    return jnp.where(mask, 0.0, MASKED).astype(jnp.float32)


def blocks(rows: int, heads: int, head_dim: int) -> tuple[int, int, int]:
    """(block_k, heads a program, num_warps) for ``rows`` x ``heads`` of ``head_dim``,
    chosen by measurement on Hopper GPUs (``benchmarks/decode_attention.py``): few programs
    (batch 1) want long blocks and many warps (a short serial loop per head), more programs
    blocks of 2048-4096 values, two heads a program at the largest batches."""
    programs = rows * heads
    if programs < 256:
        return 128, 1, 8 if head_dim >= 128 else 4
    if programs < 1024:
        return (32, 1, 2) if head_dim >= 128 else (64, 1, 4)
    return 16, 2 if heads % 2 == 0 else 1, 4


def _kernel(qkv_ref, k_ref, v_ref, bias_ref, idx_ref, o_ref, k_out, v_out, *, block_k: int,
            scale: float):
    idx = idx_ref[0]  # the new position; older positions are [0, idx)
    q = qkv_ref[0].astype(jnp.float32) * scale  # (G, D)
    k_new, v_new = qkv_ref[1], qkv_ref[2]
    k_out[pl.ds(idx, 1)] = k_new[None].astype(k_out.dtype)
    v_out[pl.ds(idx, 1)] = v_new[None].astype(v_out.dtype)
    offs = jnp.arange(block_k)

    # one online softmax per lane (position within the block) and head; combined at the end
    def body(i, carry):
        m, total, acc = carry
        start = pl.multiple_of(i * block_k, block_k)
        rows = pl.ds(start, block_k)
        ok = start + offs < idx
        k = plgpu.load(k_ref.at[rows], mask=ok[:, None, None], other=0.0).astype(jnp.float32)
        b = plgpu.load(bias_ref.at[rows], mask=ok, other=MASKED)
        v = plgpu.load(v_ref.at[rows], mask=ok[:, None, None], other=0.0).astype(jnp.float32)
        s = jnp.sum(k * q[None], axis=2) + b[:, None]  # (block_k, G)
        m_new = jnp.maximum(m, s)
        corr, p = jnp.exp(m - m_new), jnp.exp(s - m_new)
        return m_new, total * corr + p, acc * corr[..., None] + p[..., None] * v

    g, d = q.shape
    init = (jnp.full((block_k, g), MASKED, jnp.float32), jnp.zeros((block_k, g), jnp.float32),
            jnp.zeros((block_k, g, d), jnp.float32))
    m, total, acc = jax.lax.fori_loop(0, pl.cdiv(idx, block_k), body, init)
    # the new position (always attended; its K/V in the cache's dtype, as a reader sees them)
    s_new = jnp.sum(k_new.astype(k_out.dtype).astype(jnp.float32) * q, axis=1)  # (G,)
    top = jnp.maximum(jnp.max(m, axis=0), s_new)
    w = jnp.exp(m - top[None])  # (block_k, G)
    p = jnp.exp(s_new - top)
    total = jnp.sum(total * w, axis=0) + p
    acc = jnp.sum(acc * w[..., None], axis=0) + p[:, None] * v_new.astype(v_out.dtype).astype(
        jnp.float32)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "heads", "num_warps",
                                             "num_stages", "interpret"))
def decode_attention(qkv: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                     index: jax.Array, *, scale: float, block_k: int | None = None,
                     heads: int | None = None, num_warps: int | None = None,
                     num_stages: int = 2,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write ``qkv`` (B, 3, A, D)'s K/V rows into k/v (B, S, A, D) at ``index`` (B,) and
    attend its queries over positions ``[0, index]`` that ``bias`` (B, S) (from
    :func:`mask_bias`) allows -> (out (B, A, D), k, v).  ``index`` must be below S.
    ``block_k`` positions a step, ``heads`` heads a program (default: :func:`blocks`)."""
    b, s, a, d = k.shape
    if not supported(d):
        raise ValueError(f"decode_attention needs a power-of-two head size >= 16, got {d}")
    if qkv.shape != (b, 3, a, d) or v.shape != k.shape or bias.shape != (b, s):
        raise ValueError(f"shapes qkv {qkv.shape}, k {k.shape}, v {v.shape}, "
                         f"bias {bias.shape}")
    bk, g, warps = blocks(b, a, d)
    bk, g, warps = block_k or bk, heads or g, num_warps or warps
    if a % g or g & (g - 1):
        raise ValueError(f"heads={g} a program must be a power of two dividing {a} heads")
    params = {}
    if not interpret:
        params["compiler_params"] = plgpu.CompilerParams(num_warps=warps,
                                                         num_stages=num_stages)
    cache = pl.BlockSpec((None, s, g, d), lambda i, h: (i, 0, h, 0))
    group = pl.BlockSpec((None, g, d), lambda i, h: (i, h, 0))
    return pl.pallas_call(
        functools.partial(_kernel, block_k=bk, scale=float(scale)),
        out_shape=(jax.ShapeDtypeStruct((b, a, d), qkv.dtype),
                   jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b, a // g),
        in_specs=[pl.BlockSpec((None, 3, g, d), lambda i, h: (i, 0, h, 0)), cache, cache,
                  pl.BlockSpec((None, s), lambda i, h: (i, 0)),
                  pl.BlockSpec((1,), lambda i, h: (i,))],
        out_specs=(group, cache, cache),
        input_output_aliases={1: 1, 2: 2},
        name="decode_attention", interpret=interpret,
        **params)(qkv, k, v, bias, index.astype(jnp.int32))
