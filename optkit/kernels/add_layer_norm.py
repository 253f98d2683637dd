"""Residual add + LayerNorm as one GPU kernel (Pallas on Triton).

A pre-LN decoder layer adds each product's output to the residual stream and normalizes the
sum for the next product.  XLA ran that as three kernels at decode time (the add with the
product's bias, the LayerNorm's reduction, its normalization), twice a layer, each a
launch and a few µs of latency for a few KB.  Here one program per row loads the residual
``x``, the product's output ``y`` and its ``bias``, keeps ``h = x + (y + bias)`` (in fp32,
rounded once to x's dtype), and writes both ``h`` (the new residual) and
``LayerNorm(h) * scale + shift``.  A row is one block of the next power of two at least its
width, the lanes past it masked.

It does not pay on an H200 (``benchmarks/add_layer_norm.py``,
``results/gpu/add_layer_norm_sweep_h200.jsonl``): at decode shapes (opt-1.3b ... 175b,
1-64 rows) XLA's three kernels took 1.9-6.7 µs together, this one, at its best warps, less
only at opt-1.3b's one row (2.5 vs 2.9 µs) and up to 1.5× longer elsewhere (13b, 64 rows:
5.8 vs 3.7 µs); whole opt-6.7b and 13b decode steps were within noise of XLA's.  So
``kernels="auto"`` leaves it out; ``kernels="norm"`` asks for it.

``interpret=True`` runs it through Pallas' interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def num_warps(width: int) -> int:
    """Warps of a program, the best measured on an H200 (4 up to 2048 values, 8 up to 8192
    (opt-6.7b ... 66b), then 16)."""
    block = pl.next_power_of_2(width)
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _kernel(x_ref, y_ref, b_ref, s_ref, t_ref, h_ref, o_ref, *, width: int, eps: float,
            one_pass: bool, interpret: bool):
    block = x_ref.shape[-1]
    live = jax.lax.broadcasted_iota(jnp.int32, (block,), 0) < width

    def load(ref):
        if interpret:  # the interpreter pads blocks with arbitrary values
            return jnp.where(live, ref[...], 0).astype(jnp.float32)
        return plgpu.load(ref, mask=live, other=0).astype(jnp.float32)

    # every load first: one trip to memory, not one before and one after the reductions
    x, y, bias, scale, shift = (load(r) for r in (x_ref, y_ref, b_ref, s_ref, t_ref))
    h = (x + (y + bias)).astype(h_ref.dtype)
    hf = jnp.where(live, h.astype(jnp.float32), 0.0)
    mean = jnp.sum(hf) / width
    if one_pass:  # both sums at once: E[h^2] - E[h]^2, as optkit.model.layer_norm
        var = jnp.maximum(jnp.sum(hf * hf) / width - mean * mean, 0.0)
    else:
        centered = jnp.where(live, hf - mean, 0.0)
        var = jnp.sum(centered * centered) / width
    out = ((hf - mean) * jax.lax.rsqrt(var + eps) * scale + shift).astype(o_ref.dtype)
    if interpret:
        h_ref[...], o_ref[...] = h, out
    else:
        plgpu.store(h_ref, h, mask=live)
        plgpu.store(o_ref, out, mask=live)


@functools.partial(jax.jit, static_argnames=("eps", "warps", "one_pass", "interpret"))
def add_layer_norm(x: jax.Array, y: jax.Array, bias: jax.Array, scale: jax.Array,
                   shift: jax.Array, *, eps: float, warps: int | None = None,
                   one_pass: bool = True, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``x``, ``y`` (R, W), ``bias``, ``scale``, ``shift`` (W,) -> (h, LayerNorm(h) * scale +
    shift), both (R, W) in x's dtype, where ``h = x + (y + bias)``; ``one_pass``: the
    variance from both sums at once (else a second pass over ``h - mean``)."""
    r, w = x.shape
    if y.shape != x.shape or any(p.shape != (w,) for p in (bias, scale, shift)):
        raise ValueError(f"add_layer_norm: x {x.shape}, y {y.shape}, bias {bias.shape}, "
                         f"scale {scale.shape}, shift {shift.shape}")
    block = pl.next_power_of_2(w)
    row = pl.BlockSpec((None, block), lambda i: (i, 0))
    vec = pl.BlockSpec((block,), lambda i: (0,))
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, width=w, eps=float(eps), one_pass=one_pass,
                          interpret=interpret),
        out_shape=(out, out), grid=(r,),
        in_specs=[row, row, vec, vec, vec], out_specs=(row, row),
        compiler_params=plgpu.CompilerParams(num_warps=warps or num_warps(w), num_stages=1),
        name="add_layer_norm", interpret=interpret)(x, y, bias, scale, shift)
