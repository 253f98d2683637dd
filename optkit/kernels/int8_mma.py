"""int8 weight-only products of a few rows on the tensor cores (Pallas on Triton).

``y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]`` over an output-major int8 kernel ``q``
(N, K), as :mod:`optkit.kernels.int8_matvec` computes on the CUDA cores.  Here the rows of
``x`` (fp16) are read as a tile of 16, 32 or 64 rows (the least power of two >= its rows and
>= 16, a tensor-core tile's least height; the rows past its own masked to zeros), and each
program takes ``block_n`` output channels, looping over
K in blocks of ``block_k``: it widens its int8 tile to fp16 and multiplies it on the tensor
cores with fp32 accumulation.  The widening takes five PTX instructions per four weights: a
byte-wise xor with 0x80 makes each byte ``b + 128``, ``prmt`` sets it under fp16's exponent
of 1024 (whose ulp is 1) to give ``1024 + 128 + b`` exactly, and ``sub.f16x2`` takes 1152
off two weights at a time.  The CUDA-core kernel executes ~25 instructions per four weights,
which keeps the multiprocessors busy issuing; with five, this one comes closer to the read
ceiling on OPT-175B's shards (``benchmarks/README.md``, 'int8 products').  The missing rows
cost only tensor-core work that would sit idle: a batch of up to 16 rows costs about what
one row does, and the widening is shared by up to 64.

``split`` programs share each block of channels, each taking a part of K, their partial sums
added after the kernel: kernels with few blocks of channels (OPT-175B's out and fc2 on two
cards: 192 programs for an H200's 132 multiprocessors) then fill the card more evenly.
``interpret=True`` runs it through Pallas' interpreter (the widening as a conversion).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

#: The least tile of rows (a tensor-core tile's height; fewer read as zeros past them), ...
ROWS = 16
#: ... the most rows a product may have, ...
LARGEST = 64
#: ... and the most the decode step gives it: at 64 rows each program re-reads the rows'
#: inputs, 4x the bytes of 16 rows, and XLA's dot is faster; at 16 and 32 rows this kernel
#: is (``benchmarks/README.md``, 'int8 products' and 'int8 weights on one H200').
MAX_ROWS = 32
#: Programs below which a kernel's K is split in two (~2 per multiprocessor of an H200).
SPLIT_BELOW = 256
#: The least output channels and inputs of a kernel this one takes for a single row: at
#: opt-6.7b's shapes it is no faster than the CUDA-core kernel, at OPT-175B's two-card
#: shards (n >= 12288, k >= 6144) it is (``benchmarks/README.md``, 'int8 products').
#: Several rows take it at any size (the other way is XLA's dot).
MIN_CHANNELS, MIN_INPUTS = 8192, 6144

#: four int8 weights (one 32-bit register) -> four fp16 weights (two registers), exactly
_WIDEN = """{
.reg .b32 u, e, o;
xor.b32 u, $2, 0x80808080;
mov.b32 e, 0x64646464;
mov.b32 o, 0x64806480;
prmt.b32 $0, u, e, 0x5150;
prmt.b32 $1, u, e, 0x5352;
sub.f16x2 $0, $0, o;
sub.f16x2 $1, $1, o;
}"""


def row_tile(rows: int) -> int:
    """The tile of rows a product of ``rows`` rows reads."""
    return max(ROWS, pl.next_power_of_2(rows))


def plan(n: int, k: int, rows: int = 1) -> tuple[int, int, int] | None:
    """(block_n, block_k, split) for an (n, k) kernel, chosen by measurement on Hopper GPUs
    at OPT-175B's shapes (64 channels x 256 weights), or None where they do not tile, or, for a
    single row, the kernel is smaller than :data:`MIN_CHANNELS` x :data:`MIN_INPUTS`."""
    block_n, block_k = 64, 256
    if n % block_n or k % block_k or rows > LARGEST:
        return None
    if rows <= 1 and (n < MIN_CHANNELS or k < MIN_INPUTS):
        return None
    split = 2 if n // block_n < SPLIT_BELOW and k % (2 * block_k) == 0 else 1
    return block_n, block_k, split


def _widen(w: jax.Array, interpret: bool) -> jax.Array:
    if interpret:
        return w.astype(jnp.float16)
    return plgpu.elementwise_inline_asm(
        _WIDEN, args=[w], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.float16)])[0]


def _kernel(x_ref, q_ref, s_ref, *refs, rows: int, block_k: int, relu: bool,
            evict: str | None, interpret: bool):
    b_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    bn, k = q_ref.shape

    tile = x_ref.shape[0]
    # rows past x's own read as zeros (masked: they lie outside its buffer); through the
    # interpreter they hold whatever it pads with, which reaches only rows never stored
    live = jax.lax.broadcasted_iota(jnp.int32, (tile, block_k), 0) < rows

    def body(i, acc):
        cols = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        w = (q_ref[:, cols] if evict is None
             else plgpu.load(q_ref.at[:, cols], eviction_policy=evict))
        xs = (x_ref[:, cols] if interpret or rows == tile
              else plgpu.load(x_ref.at[:, cols], mask=live, other=0.0))
        return acc + plgpu.dot(xs, _widen(w, interpret), trans_b=True)

    acc = jax.lax.fori_loop(0, k // block_k, body, jnp.zeros((tile, bn), jnp.float32))
    y = acc * s_ref[...].astype(jnp.float32)[None, :]
    if b_ref is not None:
        y = y + b_ref[...].astype(jnp.float32)[None, :]
    if relu:
        y = jnp.maximum(y, 0.0)
    y = y.astype(o_ref.dtype)
    if interpret or rows == tile:
        o_ref[...] = y
    else:  # only x's own rows: the block's others lie outside the output
        plgpu.store(o_ref, y, mask=jax.lax.broadcasted_iota(jnp.int32, y.shape, 0) < rows)


@functools.partial(jax.jit, static_argnames=("relu", "out_dtype", "block_n", "block_k",
                                             "split", "num_warps", "num_stages", "evict",
                                             "interpret"))
def int8_mma(x: jax.Array, q: jax.Array, scale: jax.Array, bias: jax.Array | None = None,
             *, relu: bool = False, out_dtype=jnp.float32, block_n: int | None = None,
             block_k: int | None = None, split: int | None = None, num_warps: int = 4,
             num_stages: int = 3, evict: str | None = "evict_first",
             interpret: bool = False) -> jax.Array:
    """``x`` (M <= 64, K) fp16 times the int8 kernel ``q`` (N, K), scaled per channel by
    ``scale`` (N,), plus ``bias`` (N,) if given, then ReLU if ``relu`` -> (M, N)
    ``out_dtype``.  Blocks default to :func:`plan`; ``evict``: as in ``int8_matvec``."""
    (m, k), (n, kq) = x.shape, q.shape
    if (m > LARGEST or x.dtype != jnp.float16 or q.dtype != jnp.int8 or kq != k
            or scale.shape != (n,) or (bias is not None and bias.shape != (n,))):
        raise ValueError(f"int8_mma: x {x.shape} {x.dtype}, q {q.shape} {q.dtype}, "
                         f"scale {scale.shape}, bias {None if bias is None else bias.shape}")
    bn, bk, sp = plan(n, k, m) or (0, 0, 1)
    bn, bk, sp = block_n or bn, block_k or bk, split or sp
    if not bn or not bk or n % bn or k % (bk * sp):
        raise ValueError(f"int8_mma: blocks ({bn}, {bk}) x {sp} do not tile ({n}, {k})")
    parts = k // sp
    channels = pl.BlockSpec((bn,), lambda i, j: (i,))
    fused = sp == 1  # else bias and ReLU after the partial sums are added
    args = [x, q, scale] + ([bias] if fused and bias is not None else [])
    out = pl.pallas_call(
        functools.partial(_kernel, rows=m, block_k=bk, relu=relu and fused,
                          evict=None if interpret else evict, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((sp, m, n), out_dtype if fused else jnp.float32),
        grid=(n // bn, sp),
        in_specs=[pl.BlockSpec((row_tile(m), parts), lambda i, j: (0, j)),
                  pl.BlockSpec((bn, parts), lambda i, j: (i, j)),
                  channels] + [channels] * (len(args) - 3),
        out_specs=pl.BlockSpec((None, row_tile(m), bn), lambda i, j: (j, 0, i)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="int8_mma", interpret=interpret)(*args)
    if fused:
        return out[0]
    y = out.sum(0) + (0.0 if bias is None else bias.astype(jnp.float32))
    return (jnp.maximum(y, 0.0) if relu else y).astype(out_dtype)
