"""Which GPU kernels an executor's decode step calls, placed on its mesh.

Two Pallas kernels can replace XLA's code in a decode step (``optkit.kernels``):

* ``attention``: the fused cache write + attention of :mod:`optkit.kernels.decode_attention`
  instead of :func:`optkit.model.dense_decode_attention` (needs a power-of-two head size);
* ``matvec``: the int8 products of int8 models' few-row products (``optkit.model.project``):
  :mod:`optkit.kernels.int8_mma` (tensor cores) for fp16 inputs where its blocks tile the
  kernel, else :mod:`optkit.kernels.int8_matvec` (CUDA cores).

A :class:`~optkit.options.Kernels` value picks them (``kernels=`` of ``get_model``): ``auto``
takes both on GPUs where they apply, else XLA; ``xla`` none; ``pallas`` all that apply to
the model; kernel names, those alone.  A kernel asked for by name (or by ``pallas``) that
cannot run is an error.  Each runs per shard under ``shard_map``, split as the rule table
splits its operands (an int8 product whose input axes are split sums its partial products
with ``psum``).  Off GPUs an explicit choice runs the kernels through Pallas' interpreter:
the same numbers, slowly (tests).
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optkit.config import OPTConfig
from optkit.model import MatVec
from optkit.options import Kernels
from optkit.parallel.rules import axis_names
from optkit.quant import KERNELS


def _module(name: str):
    """The kernel module, or None and why (Pallas is experimental: a JAX may lack it)."""
    try:
        return importlib.import_module(f"optkit.kernels.{name}"), None
    except ImportError as e:
        return None, f"Pallas is unavailable in this JAX ({e})"


def on_gpus(mesh: Mesh) -> bool:
    """Whether every device of ``mesh`` is a GPU."""
    return all(d.platform == "gpu" for d in mesh.devices.flat)


def _decide(kernels: Kernels, kernel: str, why: str | None, mesh: Mesh) -> bool:
    """Whether to run ``kernel``; raises where it was asked for and cannot run."""
    if not kernels.wants(kernel):
        return False
    if why is None and not kernels.required and not on_gpus(mesh):
        why = "not on GPUs"
    if why is None:
        return True
    if kernels.required:
        raise ValueError(f"kernels={str(kernels)!r}: the {kernel} kernel cannot run here: {why}")
    return False


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------
def resolve_attention(kernels: Kernels, cfg: OPTConfig, mesh: Mesh, kv_spec: PartitionSpec) -> str:
    """``"xla"`` or ``"pallas"``: the decode attention for this model on this mesh
    (``kv_spec``: the cache's partitioning)."""
    kernel, why = _module("decode_attention")
    if why is None and not kernel.supported(cfg.head_dim):
        why = f"head size {cfg.head_dim} is not a power of two >= 16"
    if why is None and (kv_spec[1] is not None or kv_spec[3] is not None):
        why = "the cache's sequence or head_dim axis is split over devices"
    return "pallas" if _decide(kernels, "attention", why, mesh) else "xla"


def decode_attention_fn(kernels: Kernels, cfg: OPTConfig, mesh: Mesh, kv_spec: PartitionSpec,
                        interpret: bool | None = None):
    """The ``attention`` argument for ``model.decode_layers``: None (the model's own) or the
    fused kernel, wrapped in ``shard_map`` over ``mesh`` when the mesh has several devices.
    ``interpret`` (default: off GPUs) runs the kernel through Pallas' interpreter."""
    if resolve_attention(kernels, cfg, mesh, kv_spec) == "xla":
        return None
    kernel, _ = _module("decode_attention")
    interpret = not on_gpus(mesh) if interpret is None else interpret
    rows, heads = kv_spec[0], kv_spec[2]

    def attend(qkv, k, v, mask, index, live, scale):
        del live  # the kernel stops at each row's own index
        call = functools.partial(kernel.decode_attention, scale=scale, interpret=interpret)
        bias = kernel.mask_bias(mask)
        if mesh.devices.size == 1:
            return call(qkv, k, v, bias, index)
        heads_spec = PartitionSpec(rows, heads, None)
        kv = PartitionSpec(rows, None, heads, None)
        fn = jax.shard_map(call, mesh=mesh, check_vma=False,
                           in_specs=(PartitionSpec(rows, None, heads, None), kv, kv,
                                     PartitionSpec(rows, None), PartitionSpec(rows)),
                           out_specs=(heads_spec, kv, kv))
        return fn(qkv, k, v, bias, index)

    return attend


# ---------------------------------------------------------------------------------------------
# int8 products
# ---------------------------------------------------------------------------------------------
def matvec_fns(kernels: Kernels, cfg: OPTConfig, mesh: Mesh, q_specs: dict, int8: bool,
               interpret: bool | None = None, dtype=None) -> dict | None:
    """The ``matvec`` argument for ``model.decode_layers``: kernel name -> the int8 product
    hook (:class:`optkit.model.MatVec`) over ``mesh``, or None (XLA's products).
    ``q_specs``: kernel name -> (shape, PartitionSpec) of one layer's ``kernel_q``; ``int8``:
    whether the model is; ``dtype``: the model's.  A hook takes one row, or up to the
    tensor-core kernel's ``MAX_ROWS`` where that kernel tiles the product of an fp16 model
    (the CUDA-core kernel multiplies on CUDA cores: at 4 rows it was half as fast as XLA's
    dot on an H200)."""
    if not kernels.wants("matvec") or (not int8 and not kernels.required):
        return None
    kernel, why = _module("int8_matvec")
    mma, _ = _module("int8_mma")
    if why is None and not int8:
        why = "the model is not int8 (get_model(..., quantize='int8'))"
    blocks = {}
    if why is None:
        for name, (shape, spec) in q_specs.items():
            n_out = len(shape) - KERNELS[name]
            local = NamedSharding(mesh, spec).shard_shape(shape)
            n, k = math.prod(local[:n_out]), math.prod(local[n_out:])
            tiles = (mma.plan(n, k), mma.plan(n, k, mma.MAX_ROWS)) if mma else (None, None)
            blocks[name] = n_out, kernel.blocks(n, k), tiles
            if not blocks[name][1][1]:
                why = f"{name}'s kernel ({n} x {k} per device) has no block tiling"
    if not _decide(kernels, "matvec", why, mesh):
        return None
    interpret = not on_gpus(mesh) if interpret is None else interpret
    fp16 = dtype is not None and jnp.dtype(dtype) == jnp.float16
    fns = {}
    for name, (n_out, words, tiles) in blocks.items():
        fn = _placed_matvec(kernel, mma, n_out, q_specs[name][1], words, tiles, mesh, interpret)
        fns[name] = MatVec(fn, mma.MAX_ROWS if tiles[1] and fp16 else 1)
    return fns


def _placed_matvec(kernel, mma, n_out: int, q_spec: PartitionSpec, blocks, tiles,
                   mesh: Mesh, interpret: bool):
    """``(x, q, scale, bias, relu) -> outputs`` in x's dtype for one kernel split as
    ``q_spec``: the tensor-core kernel ``mma`` for fp16 inputs where ``tiles`` (its plans for
    one row and for several) has one, else the CUDA-core ``kernel`` with ``blocks``.  Where
    the input axes are split, the kernel's fp32 partial products are psum'ed and the bias
    added after; else bias and ReLU run in the kernel."""
    block_n, block_k, warps = blocks
    out_spec, in_spec = tuple(q_spec[:n_out]), tuple(q_spec[n_out:])
    summed = tuple(n for s in in_spec for n in axis_names(s))

    def local(x, q, scale, bias, relu):
        n_in = q.ndim - n_out
        lead, out = x.shape[:x.ndim - n_in], q.shape[:n_out]
        k = math.prod(q.shape[n_out:])
        plan = tiles[math.prod(lead) > 1]
        if plan and x.dtype == jnp.float16:
            call = functools.partial(mma.int8_mma, block_n=plan[0], block_k=plan[1],
                                     split=plan[2], interpret=interpret)
        else:
            call = functools.partial(kernel.int8_matvec, block_n=block_n, block_k=block_k,
                                     num_warps=warps, interpret=interpret)
        x2, q2, s2 = x.reshape(-1, k), q.reshape(-1, k), scale.reshape(-1)
        b2 = None if bias is None else bias.reshape(-1)
        if not summed:
            return call(x2, q2, s2, b2, relu=relu, out_dtype=x.dtype).reshape(lead + out)
        y = jax.lax.psum(call(x2, q2, s2).reshape(lead + out), summed).astype(x.dtype)
        y = y if bias is None else y + bias
        return jax.nn.relu(y) if relu else y

    def matvec(x, q, scale, bias, relu=False):
        """``bias`` None: the caller adds it."""
        args = (x, q, scale) + (() if bias is None else (bias,))

        def fn(*a):
            return local(*a[:3], a[3] if len(a) > 3 else None, relu)

        if mesh.devices.size == 1:
            return fn(*args)
        rows = (None,) * (x.ndim - (q.ndim - n_out))  # a few rows: every device takes all
        channels = PartitionSpec(*out_spec)
        specs = (PartitionSpec(*rows, *in_spec), q_spec, channels, channels)
        fn = jax.shard_map(fn, mesh=mesh, check_vma=False, in_specs=specs[:len(args)],
                           out_specs=PartitionSpec(*rows, *out_spec))
        return fn(*args)

    return matvec


def decode_kernels(kernels: Kernels, cfg: OPTConfig, mesh: Mesh, kv_spec: PartitionSpec,
                   q_specs: dict, int8: bool, dtype=None) -> dict:
    """Keyword arguments (``attention``, ``matvec``) of ``model.decode_step`` under
    ``kernels`` (see the module docstring) for a model of ``dtype``."""
    return {"attention": decode_attention_fn(kernels, cfg, mesh, kv_spec),
            "matvec": matvec_fns(kernels, cfg, mesh, q_specs, int8, dtype=dtype)}
