"""int8 weight-only products of a few rows as one GPU kernel (Pallas on Triton).

``y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]`` over an output-major int8 kernel ``q``
(N, K).  Decoding a few rows reads every weight once per step, so the product should run at
the speed of reading ``q``.  XLA widens each int8 with a conversion instruction, which
Hopper issues at 16 per clock per SM (CUDA's throughput table): about the rate an H200's HBM
delivers bytes, which is our reading of why XLA's product stays well below the read
ceiling there (``benchmarks/README.md``, 'int8 products').  This kernel reads ``q`` as 32-bit
words (four weights each) and widens them with integer masks: a byte ``u`` (offset by 128)
or-ed into the mantissa of 2**23 is the float 2**23 + u, and one subtraction leaves the
weight, exactly.  Bytes 1 and 3 are masked in place (a float of 256 * weight), so their
inputs are pre-scaled by 1/256; bytes 2 and 3 come from the word shifted by 16.  Bias and
ReLU are applied before the single store (no small XLA kernel after the product).

A program handles ``block_n`` output channels, looping over K in blocks of ``block_k``
weights.  Within a block it takes one channel at a time, so each thread loads its inputs
once and reuses them for every channel (a 2-D tile of channels x words would load the
inputs once per channel).  Each (channel, word) keeps an fp32
partial sum, reduced once at the end.
``interpret=True`` runs it through Pallas' interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MAGIC = 0x4B000000  # the bits of 2.0 ** 23
_FLIP = -0x7F7F7F80  # 0x80808080 as int32: turns each signed byte into byte + 128
#: (mask, the float it leaves above the weight) for the byte in place in a word's low half
_LOW, _HIGH = (0xFF, 2.0 ** 23 + 128), (0xFF00, 2.0 ** 23 + 128 * 256)


def supported(n: int, k: int, block_n: int, block_k: int) -> bool:
    """Whether the blocks tile an (n, k) kernel."""
    return n % block_n == 0 and k % block_k == 0 and block_k % 4 == 0


def blocks(n: int, k: int) -> tuple[int, int, int]:
    """(block_n, block_k, num_warps) for an (n, k) kernel, chosen by measurement on Hopper
    GPUs (``benchmarks/gemv_pallas.py``): 8 channels x 2048 weights for long rows (OPT-175B's
    kernels split over two cards), 4 x 1024 for shorter ones (opt-6.7b's); smaller blocks
    where those do not tile."""
    big = k >= 6144
    block_k = next((b for b in (2048, 1024, 512, 256, 128, 64, 32, 16)
                    if k % b == 0 and (big or b <= 1024)), 0)
    block_n = next((b for b in (8, 4, 2, 1) if n % b == 0 and (big or b <= 4)), 1)
    return block_n, block_k, 4


def _split_inputs(x: jax.Array) -> jax.Array:
    """(M, K) -> (M, 4, K/4) float32: byte j of word w multiplies x[:, 4w + j]; bytes 1 and 3
    are read as 256 * weight, so their inputs are divided by 256 (exact: a power of two).
    Done once per call here, so the kernel's programs need no strided loads of the inputs."""
    m, k = x.shape
    parts = x.astype(jnp.float32).reshape(m, k // 4, 4).transpose(0, 2, 1)
    return parts * jnp.asarray([1.0, 1 / 256, 1.0, 1 / 256], jnp.float32)[None, :, None]


def _widen(word: jax.Array, mask: int, offset: float) -> jax.Array:
    bits = jax.lax.bitwise_or(jax.lax.bitwise_and(word, jnp.int32(mask)), jnp.int32(_MAGIC))
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(offset)


def _kernel(x_ref, q_ref, s_ref, *refs, rows: int, block_w: int, relu: bool,
            evict: str | None):
    b_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    bn, words = q_ref.shape

    def load(c, cols):  # channel c's words; each is read once per call
        if evict is None:  # (Pallas' interpreter cannot take plgpu.load at index c)
            return q_ref[c, cols]
        return plgpu.load(q_ref.at[c, cols], eviction_policy=evict)

    def body(i, accs):
        cols = pl.ds(pl.multiple_of(i * block_w, block_w), block_w)
        xs = [[x_ref[m, j, cols] for j in range(4)] for m in range(rows)]
        out = list(accs)
        for c in range(bn):
            w = jax.lax.bitwise_xor(load(c, cols), jnp.int32(_FLIP))
            hi = jax.lax.shift_right_logical(w, jnp.int32(16))
            parts = (_widen(w, *_LOW), _widen(w, *_HIGH), _widen(hi, *_LOW),
                     _widen(hi, *_HIGH))
            for m in range(rows):
                acc = out[m * bn + c]
                for j, part in enumerate(parts):
                    acc = acc + part * xs[m][j]
                out[m * bn + c] = acc
        return tuple(out)

    init = tuple(jnp.zeros((block_w,), jnp.float32) for _ in range(rows * bn))
    accs = jax.lax.fori_loop(0, words // block_w, body, init)
    scale = s_ref[...]
    channel = jnp.arange(bn)
    for m in range(rows):
        y = jnp.zeros((bn,), jnp.float32)
        for c in range(bn):
            y = y + jnp.where(channel == c, jnp.sum(accs[m * bn + c]), 0.0)
        y = y * scale
        if b_ref is not None:
            y = y + b_ref[...].astype(jnp.float32)
        if relu:
            y = jnp.maximum(y, 0.0)
        o_ref[m, :] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("relu", "out_dtype", "block_n", "block_k",
                                             "num_warps", "num_stages", "evict", "interpret"))
def int8_matvec(x: jax.Array, q: jax.Array, scale: jax.Array, bias: jax.Array | None = None,
                *, relu: bool = False, out_dtype=jnp.float32, block_n: int | None = None,
                block_k: int | None = None, num_warps: int | None = None,
                num_stages: int = 3, evict: str | None = "evict_first",
                interpret: bool = False) -> jax.Array:
    """``x`` (M, K) times the int8 kernel ``q`` (N, K), scaled per channel by ``scale`` (N,),
    plus ``bias`` (N,) if given, then ReLU if ``relu`` -> (M, N) ``out_dtype``.  Meant for a
    few rows (every row costs a multiply per weight).  ``evict``: the L2 eviction policy of
    the weight loads (Triton's; None: the default), evict_first since the weights are
    streamed once and would only push reused data out of L2 (ignored when
    ``interpret``)."""
    (m, k), (n, kq) = x.shape, q.shape
    if (q.dtype != jnp.int8 or kq != k or scale.shape != (n,)
            or (bias is not None and bias.shape != (n,))):
        raise ValueError(f"int8_matvec: x {x.shape}, q {q.shape} {q.dtype}, "
                         f"scale {scale.shape}, bias {None if bias is None else bias.shape}")
    bn, bk, warps = blocks(n, k)
    bn, bk, warps = block_n or bn, block_k or bk, num_warps or warps
    if not bk or not supported(n, k, bn, bk):
        raise ValueError(f"int8_matvec: blocks ({bn}, {bk}) do not tile ({n}, {k})")
    words = jax.lax.bitcast_convert_type(q.reshape(n, k // 4, 4), jnp.int32)
    params = {}
    if not interpret:
        params["compiler_params"] = plgpu.CompilerParams(num_warps=warps,
                                                         num_stages=num_stages)
    channels = pl.BlockSpec((bn,), lambda i: (i,))
    args = [_split_inputs(x), words, scale.astype(jnp.float32)]
    args += [] if bias is None else [bias]
    return pl.pallas_call(
        functools.partial(_kernel, rows=m, block_w=bk // 4, relu=relu,
                          evict=None if interpret else evict),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(n // bn,),
        in_specs=[pl.BlockSpec((m, 4, k // 4), lambda i: (0, 0, 0)),
                  pl.BlockSpec((bn, k // 4), lambda i: (i, 0)),
                  channels] + [channels] * (bias is not None),
        out_specs=pl.BlockSpec((m, bn), lambda i: (0, i)),
        name="int8_matvec", interpret=interpret, **params)(*args)
