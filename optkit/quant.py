"""int8 weight-only quantization: per-output-channel absmax scales, dequantized in the matmul.

The four matmul kernels of every layer (qkv, out, fc1, fc2) become ``kernel_q`` (int8) plus
``kernel_scale`` (one fp32 scale per output channel); embeddings, LayerNorms and biases stay in
the model dtype.  Weight bytes nearly halve, which is what bounds decoding.

``kernel_q`` is stored output-major: the kernel's output axes first, then its input axes (so
(embed, 3, heads, head_dim) becomes (3, heads, head_dim, embed)), logical axes permuted alike.
Each output channel's weights are then contiguous, which lets a decode step of one row
compute a product as one fused widen-multiply-reduce that streams the int8 bytes once
(``optkit.model.project``); on an H200 that made int8 decoding of opt-6.7b 1.7x faster than
XLA's dot over an input-major int8 kernel (``benchmarks/results/gpu/``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from optkit.config import OPTConfig
from optkit.weights.layout import ParamSpec, param_specs, tree_from_specs

#: Kernel name -> number of leading input dims (the rest are output channels).
KERNELS = {"qkv": 1, "out": 2, "fc1": 1, "fc2": 1}


def _is_kernel(spec: ParamSpec) -> bool:
    return len(spec.path) >= 2 and spec.path[-1] == "kernel" and spec.path[-2] in KERNELS


#: Leaves whose dtype is not the model's: ``ParamSpec.init`` -> dtype.
QUANT_DTYPES = {"int8": jnp.int8, "scale": jnp.float32}


def spec_dtype(spec: ParamSpec, dtype):
    """The dtype a leaf of ``spec`` has in a model of ``dtype`` (int8 kernels, fp32 scales)."""
    return jnp.dtype(QUANT_DTYPES.get(spec.init, dtype))


def quantized_specs(cfg: OPTConfig) -> list[ParamSpec]:
    """The param table of an int8 model: each matmul kernel split into an output-major q and
    a scale with the kernel's output axes (sharding rules apply unchanged)."""
    return quantize_specs(param_specs(cfg))


def quantize_specs(specs) -> list[ParamSpec]:
    """``specs`` with every matmul kernel replaced by its int8 q and scale (see
    :func:`quantized_specs`)."""
    out = []
    for spec in specs:
        if not _is_kernel(spec):
            out.append(spec)
            continue
        n_in = KERNELS[spec.path[-2]]
        out.append(ParamSpec(spec.path[:-1] + ("kernel_q",),
                             spec.shape[n_in:] + spec.shape[:n_in],
                             spec.axes[n_in:] + spec.axes[:n_in], "int8", spec.sources,
                             spec.read))
        out.append(ParamSpec(spec.path[:-1] + ("kernel_scale",), spec.shape[n_in:],
                             spec.axes[n_in:], "scale", spec.sources, spec.read))
    return out


def quantize_kernel(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
    """(int8 q, fp32 scale) of a kernel with ``n_in`` leading input axes: q output-major (see
    the module docstring), scale per output channel, w ~= moveaxis(q) * scale."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=tuple(range(n_in)))
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
    return jnp.transpose(q, tuple(range(n_in, w.ndim)) + tuple(range(n_in))), scale


def quantize_params(params: dict) -> dict:
    """Quantize every layer's matmul kernels of a params tree."""
    def layer(lp):
        out = dict(lp)
        for name, n_in in KERNELS.items():
            q, scale = jax.jit(quantize_kernel, static_argnums=1)(lp[name]["kernel"], n_in)
            out[name] = {"kernel_q": q, "kernel_scale": scale, "bias": lp[name]["bias"]}
        return out

    return {**params, "layers": [layer(lp) for lp in params["layers"]]}


@functools.cache
def _quantizer(n_in: int, shardings):
    return jax.jit(quantize_kernel, static_argnums=1, out_shardings=shardings)


def load_int8_params(store, cfg: OPTConfig, dtype=jnp.float16, sharding_for=None,
                     checksums: bool = False, progress: bool = True) -> dict:
    """An int8 model read from a weight store (e.g. an fp16 folder): each matmul kernel is
    quantized on its devices as soon as it is read, so no more than one full-precision kernel
    is ever held (OPT-175B's int8 weights fit 2 x 141 GB; its fp16 ones do not)."""
    from optkit.weights.load import check_store, load_bar, read_leaf

    check_store(store, cfg, checksums=checksums)
    original = {s.path: s for s in param_specs(cfg)}
    specs = quantized_specs(cfg)
    by_path = {s.path: s for s in specs}
    itemsize = jnp.dtype(dtype).itemsize
    bar = load_bar(cfg, dtype, progress)
    done: dict[tuple, dict] = {}

    def place(spec):
        return sharding_for(spec) if sharding_for else None

    def leaf(spec: ParamSpec):
        *owner, name = spec.path
        owner = tuple(owner)
        if name not in ("kernel_q", "kernel_scale"):
            arr = read_leaf(store, spec, dtype, place(spec))
            bar.update(spec.size * itemsize)
            return arr
        if owner not in done:
            src = original[owner + ("kernel",)]
            shardings = None
            if sharding_for:
                shardings = (place(by_path[owner + ("kernel_q",)]),
                             place(by_path[owner + ("kernel_scale",)]))
            w = read_leaf(store, src, dtype, place(src))
            q, scale = _quantizer(KERNELS[owner[-1]], shardings)(w, KERNELS[owner[-1]])
            del w
            done[owner] = {"kernel_q": q, "kernel_scale": scale}
            bar.update(src.size * itemsize)
        out = done[owner].pop(name)
        if not done[owner]:
            del done[owner]
        return out

    try:
        return tree_from_specs(specs, leaf)
    finally:
        bar.close()


@functools.cache
def _random_leaf(shape, init, dtype, sharding):
    def make(key):
        n = (math.prod(shape),)  # flat draws compile much faster than N-d ones
        if init == "int8":
            return jax.random.randint(key, n, -127, 128, jnp.int8).reshape(shape)
        if init == "scale":
            return jnp.full(shape, 0.02 / 64, jnp.float32) * \
                (1 + 0.1 * jax.random.uniform(key, n, jnp.float32).reshape(shape))
        x = 0.02 * jax.random.normal(key, n, dtype).reshape(shape)
        return x + 1 if init == "ones" else x
    return jax.jit(make, out_shardings=sharding)


def random_int8_params(cfg: OPTConfig, seed: int = 0, dtype=jnp.float16,
                       sharding_for=None) -> dict:
    """Random int8 model created on device (for shapes that do not fit in fp16)."""
    base = jax.random.key(seed)
    specs = quantized_specs(cfg)
    index = {s.path: i for i, s in enumerate(specs)}

    def leaf(spec):
        sharding = sharding_for(spec) if sharding_for else None
        return _random_leaf(spec.shape, spec.init, jnp.dtype(dtype).name, sharding)(
            jax.random.fold_in(base, index[spec.path]))

    return tree_from_specs(specs, leaf)
