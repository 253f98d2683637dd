"""Executors run the model's pure functions on devices; generation and serving only call them.

An executor owns the params (already placed on its devices) and exposes jitted, cache-donating
``prefill`` / ``decode`` plus helpers the decoding loops need.  The cache is opaque to callers.
:class:`MeshExecutor` covers one device and every SPMD strategy on one mesh (data and tensor
parallel): the strategy is only a table from logical axis names to mesh axes.  Pipeline
parallelism composes several of them (``optkit.parallel.pipeline``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optkit import model as M
from optkit.config import OPTConfig
from optkit.parallel.dispatch import settled
from optkit.parallel.kernels import check_kernels, decode_kernels, on_gpus
from optkit.parallel.lookup import vocab_lookup
from optkit.parallel.rules import axis_names
from optkit.parallel.transfer import move
from optkit.weights.layout import ParamSpec, embed_tokens_spec

#: Logical axis name -> mesh axis name (or tuple of names, or None for replicated).
Rules = Mapping[str, str | tuple[str, ...] | None]

#: Attention over the KV cache reads positions in multiples of this many (see ``live``).
LIVE_BUCKET = 128

#: XLA options of the decode jits on GPUs: replay each step's kernels (the decode loop's
#: body included) as CUDA graphs, however few; a decode step is many small kernels.
GPU_DECODE_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL",
    "xla_gpu_graph_min_graph_size": 1,
}
#: ... where a decode step has collectives (weights split over devices): they go into the
#: graphs too, through NCCL (XLA's own one-shot all-reduce kernel runs outside them), and
#: the loop's WHILE/CONDITIONAL nodes do not (NCCL collectives fail to instantiate in graphs
#: with conditional nodes, NVIDIA/nccl#1986): a decode step is one graph (two H200s, the
#: same options set through XLA_FLAGS with synchronous all-reduces: OPT-175B int8 1.2%,
#: opt-13b 1.1% faster a step).
GPU_MULTI_DECODE_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES",
    "xla_gpu_graph_min_graph_size": 1,
    "xla_gpu_unsupported_use_all_reduce_one_shot_kernel": False,
}
#: ... added for an fp16/bf16 model's decode jits on GPUs where every device's products take
#: at least :data:`LARGE_BATCH_ROWS` rows: the products through cuBLASLt, whose epilogues
#: take the bias, ReLU and residual adds, instead of XLA's Triton GEMMs, which leave them to
#: four more kernels a layer (one H200, ms a step: opt-1.3b batch 64 2.162 -> 2.043,
#: opt-6.7b batch 64 6.092 -> 5.617; slower at opt-1.3b batch 16, 1.446 -> 1.604, and
#: opt-6.7b batch 1, 3.974 -> 4.089; 32 rows not measured).
#: int8 models keep the Triton GEMMs: they widen the weights inside the product.  (bf16
#: models take the same options; not measured.)
GPU_LARGE_BATCH_OPTIONS = {"xla_gpu_enable_triton_gemm": False,
                           "xla_gpu_enable_cublaslt": True}
LARGE_BATCH_ROWS = 64
#: Environment variable choosing the decode jits' graph options on GPUs: ``auto`` (the
#: above, by whether a step has collectives), ``single`` (:data:`GPU_DECODE_OPTIONS`
#: everywhere: collectives stay outside the graphs, as before 2026-11-26), ``off`` (none).
GRAPHS_ENV = "OPTKIT_CUDA_GRAPHS"


def decode_graph_options(collectives: bool) -> dict:
    """The decode jits' XLA options on GPUs, for a step with or without ``collectives``
    (see :data:`GRAPHS_ENV`)."""
    choice = os.environ.get(GRAPHS_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "single", "off"):
        raise ValueError(f"{GRAPHS_ENV}={choice!r}: choose auto, single or off")
    if choice == "off":
        return {}
    multi = collectives and choice == "auto"
    return dict(GPU_MULTI_DECODE_OPTIONS if multi else GPU_DECODE_OPTIONS)

CACHE_AXES = {
    "kv": ("batch", "cache_seq", "heads", "head_dim"),
    "kv_stacked": ("layers", "batch", "cache_seq", "heads", "head_dim"),
    "mask": ("batch", "cache_seq"),
    "index": ("batch",),
}


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    device = device or jax.devices()[0]
    return Mesh(np.array([device]).reshape(1, 1), ("data", "tensor"))


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], rules: Rules,
                   mesh: Mesh) -> PartitionSpec:
    """Map logical axes to mesh axes; a dim the mesh axes do not divide stays replicated."""
    out, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        target = rules.get(name) if name else None
        if target is None:
            out.append(None)
            continue
        names = tuple(n for n in axis_names(target) if n in mesh.shape and n not in used)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if size == 1 or dim % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


class Executor:
    """What every executor shares; subclasses provide init_cache, prefill, decode,
    decode_loop, select and insert."""

    _fns: dict[Any, Any]

    def _once(self, key, make: Callable[[], Any]) -> Any:
        """What is cached under ``key`` (a jitted function, a shape's kernels), made by
        ``make()`` (shardings, compiler options, the jit) only the first time: dispatches with
        a known key do none of that work.  A function's results are awaited where dispatch
        is synchronous (:mod:`optkit.parallel.dispatch`)."""
        if key not in self._fns:
            made = make()
            self._fns[key] = settled(made) if callable(made) else made
        return self._fns[key]

    def logits(self, tokens, attention_mask=None):
        """Full-sequence logits (B,T,V) without keeping a cache."""
        tokens = np.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
        if attention_mask is None:
            attention_mask = np.ones(tokens.shape, np.int32)
        cache = self.init_cache(tokens.shape[0], tokens.shape[1])
        logits, _ = self.prefill(tokens, attention_mask, cache, all_logits=True)
        return logits


class MeshExecutor(Executor):
    """Jitted prefill/decode of one model on one mesh under a sharding-rule table.

    ``kernels``: see ``optkit.parallel.kernels``; ``command_buffers`` (default: on GPUs)
    compiles the decode jits with :data:`GPU_MULTI_DECODE_OPTIONS` where weights are split
    over devices, else :data:`GPU_DECODE_OPTIONS` (:data:`GRAPHS_ENV` overrides)."""

    def __init__(self, cfg: OPTConfig, params: Any, mesh: Mesh | None = None,
                 rules: Rules | None = None, dtype=None, kernels: str = "auto",
                 command_buffers: bool | None = None):
        self.cfg = cfg
        self.kernels = check_kernels(kernels)
        self.mesh = mesh or single_device_mesh()
        self.rules = dict(rules or {})
        self.params = params
        self.dtype = jnp.dtype(dtype or jax.tree.leaves(params)[0].dtype)
        self.stacked = isinstance(params["layers"], dict)
        self._fns: dict[Any, Any] = {}
        if "matvec" in self.kernels.split(",") and not self.int8:
            raise ValueError(f"kernels={self.kernels!r}: the matvec kernel runs int8 products, "
                             "but the model is not int8 (quantize='int8')")
        self.gpu = on_gpus(self.mesh)
        if command_buffers is None:
            command_buffers = self.gpu
        self.decode_options = (decode_graph_options(self.splits_weights)
                               if command_buffers else {})

    @property
    def splits_weights(self) -> bool:
        """Whether some axis besides the batch is split over several devices (so a decode
        step has collectives; data parallelism alone has none)."""
        return any(math.prod(self.mesh.shape.get(a, 1) for a in axis_names(target)) > 1
                   for name, target in self.rules.items() if name != "batch")

    def rows_per_device(self, batch: int) -> int:
        """How many of ``batch`` rows each device's products take (the batch may be split)."""
        return self.batch_sharding((batch,)).shard_shape((batch,))[0]

    def decode_options_for(self, batch: int) -> dict:
        """The decode jits' XLA options for ``batch`` rows: :attr:`decode_options`, plus
        :data:`GPU_LARGE_BATCH_OPTIONS` for large batches of an fp16/bf16 model on GPUs."""
        if (self.gpu and not self.int8
                and self.rows_per_device(batch) >= LARGE_BATCH_ROWS):
            return {**self.decode_options, **GPU_LARGE_BATCH_OPTIONS}
        return self.decode_options

    # Shardings -----------------------------------------------------------------------------
    def sharding(self, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, partition_spec(axes, shape, self.rules, self.mesh))

    def param_sharding(self, spec: ParamSpec) -> NamedSharding:
        return self.sharding(spec.axes, spec.shape)

    def cache_shardings(self, batch: int, max_len: int) -> dict:
        a, d = self.cfg.num_attention_heads, self.cfg.head_dim
        if self.stacked:
            n = self.cfg.num_hidden_layers
            kv = self.sharding(CACHE_AXES["kv_stacked"], (n, batch, max_len, a, d))
        else:
            kv = [self.sharding(CACHE_AXES["kv"], (batch, max_len, a, d))] * \
                 self.cfg.num_hidden_layers
        return {"k": kv, "v": kv, "mask": self.sharding(CACHE_AXES["mask"], (batch, max_len)),
                "index": self.sharding(CACHE_AXES["index"], (batch,))}

    @property
    def int8(self) -> bool:
        """Whether the model's matmul kernels are int8 (``optkit.quant``)."""
        layers = self.params["layers"]
        first = layers if self.stacked else layers[0] if layers else {}  # a stage may have none
        return "kernel_q" in first.get("qkv", {})

    @functools.cached_property
    def int8_kernel_specs(self) -> dict:
        """Kernel name -> (shape, PartitionSpec) of one layer's int8 ``kernel_q``."""
        from optkit.quant import KERNELS, quantized_specs

        specs = {s.path[2]: s for s in quantized_specs(self.cfg)
                 if s.path[:2] == ("layers", 0) and s.path[-1] == "kernel_q"}
        return {name: (specs[name].shape, self.param_sharding(specs[name]).spec)
                for name in KERNELS}

    @functools.cached_property
    def embed_lookup(self) -> Callable | None:
        """The token lookup ``model.embed`` takes on this mesh (``optkit.parallel.lookup``):
        None unless the rules split the table's vocabulary."""
        return vocab_lookup(self.mesh, self.param_sharding(embed_tokens_spec(self.cfg)).spec,
                            lambda shape: self.batch_sharding(shape).spec)

    def decode_kernels(self, batch: int, max_len: int) -> dict:
        """Keyword arguments (``attention``, ``matvec``, ``norm``) of ``model.decode_step``
        for this batch and cache (see ``optkit.parallel.kernels``)."""
        def make():  # asked on every dispatch: resolved once per shape
            shape = (batch, max_len, self.cfg.num_attention_heads, self.cfg.head_dim)
            spec = partition_spec(CACHE_AXES["kv"], shape, self.rules, self.mesh)
            hidden = partition_spec(("batch", None, "embed"), (batch, 1, self.cfg.hidden_size),
                                    self.rules, self.mesh)
            return decode_kernels(self.kernels, self.cfg, self.mesh, spec,
                                  self.int8_kernel_specs if self.int8 else {}, self.int8,
                                  self.dtype, hidden)

        return self._once(("kernels", batch, max_len), make)

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        return self.sharding(("batch",) + (None,) * (len(shape) - 1), shape)

    def logits_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        return self.sharding(("batch",) + (None,) * (len(shape) - 2) + ("vocab",), shape)

    def put_batch(self, x) -> jax.Array:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return move(x, self.batch_sharding(tuple(x.shape)))

    # Cache ---------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        return self._once(("init", batch, max_len), lambda: jax.jit(
            functools.partial(M.init_cache, self.cfg, batch, max_len, self.dtype, self.stacked),
            out_shardings=self.cache_shardings(batch, max_len)))()

    # Model calls ---------------------------------------------------------------------------
    def prefill(self, tokens, attention_mask, cache, all_logits: bool = False):
        """Prompts (B,T) into an empty cache -> (logits (B,T,V) or (B,V), cache)."""
        tokens, attention_mask = self.put_batch(tokens), self.put_batch(attention_mask)
        b, t = tokens.shape
        s = cache_len(cache)
        shape = (b, t, self.cfg.vocab_size) if all_logits else (b, self.cfg.vocab_size)
        fn = self._once(("prefill", all_logits, b, t, s), lambda: jax.jit(
            lambda p, x, m, c: M.prefill(p, self.cfg, x, m, c, all_logits=all_logits,
                                         lookup=self.embed_lookup),
            donate_argnums=(3,),
            out_shardings=(self.logits_sharding(shape), self.cache_shardings(b, s))))
        return fn(self.params, tokens, attention_mask, cache)

    def live_bucket(self, live: int | None, cache) -> int:
        """Static attention length for a dispatch: ``live`` rounded up to LIVE_BUCKET (the
        whole cache under the fused kernel, which stops at each row's own index anyway: one
        compilation instead of one per bucket)."""
        s = cache_len(cache)
        fused = self.decode_kernels(int(cache["mask"].shape[0]), s)["attention"] is not None
        if live is None or fused:
            return s
        return min(s, -(-int(live) // LIVE_BUCKET) * LIVE_BUCKET)

    def decode(self, tokens, cache, live: int | None = None):
        """One token per row (B,) -> (logits (B,V), cache); the old cache is donated.

        ``live``: an upper bound on every row's position after this step (lets attention
        read only that much of the cache)."""
        tokens = self.put_batch(tokens)
        b, s = tokens.shape[0], cache_len(cache)
        n = self.live_bucket(live, cache)
        kern = self.decode_kernels(b, s)
        fn = self._once(("decode", b, s, n), lambda: jax.jit(
            lambda p, x, c: M.decode_step(p, self.cfg, x, c, n, lookup=self.embed_lookup,
                                          **kern),
            donate_argnums=(2,), compiler_options=self.decode_options_for(b),
            out_shardings=(self.logits_sharding((b, self.cfg.vocab_size)),
                           self.cache_shardings(b, s))))
        return fn(self.params, tokens, cache)

    def decode_loop(self, step_fn: Callable, tokens, cache, state, num_steps: int,
                    live: int | None = None, max_steps: int | None = None):
        """``num_steps`` decode steps in one dispatch.

        ``step_fn(logits, state) -> (next_tokens, state, out)`` is pure JAX (sampling, logits
        processors) and must be the same function object across calls (it keys the compile
        cache).  ``out`` leaves are stacked over steps.  The trip count is dynamic: one
        compilation serves every ``num_steps`` up to ``max_steps`` (default: the next power
        of two).  ``live`` bounds every row's position after the dispatch (attention then
        reads only that much of the cache).  Returns (tokens, cache, state, outs).
        """
        tokens = self.put_batch(tokens)
        max_steps = max_steps or 1 << max(0, int(num_steps) - 1).bit_length()
        if not 0 < num_steps <= max_steps:
            raise ValueError(f"num_steps={num_steps} must be in [1, max_steps={max_steps}]")
        b, s = tokens.shape[0], cache_len(cache)
        n_live = self.live_bucket(live, cache)
        cfg, kern, lookup = self.cfg, self.decode_kernels(b, s), self.embed_lookup

        def run(params, tokens, cache, state, n):
            logits_shape = jax.ShapeDtypeStruct((b, cfg.vocab_size), jnp.float32)
            _, _, out_shape = jax.eval_shape(step_fn, logits_shape, state)
            outs = jax.tree.map(lambda o: jnp.zeros((max_steps, *o.shape), o.dtype), out_shape)

            def body(i, carry):
                tok, c, st, outs = carry
                logits, c = M.decode_step(params, cfg, tok, c, n_live, lookup=lookup, **kern)
                tok, st, out = step_fn(logits, st)
                outs = jax.tree.map(
                    lambda buf, o: jax.lax.dynamic_update_index_in_dim(buf, o, i, 0), outs, out)
                return tok, c, st, outs

            return jax.lax.fori_loop(0, n, body, (tokens, cache, state, outs))

        fn = self._once(("loop", step_fn, max_steps, b, s, n_live), lambda: jax.jit(
            run, donate_argnums=(2,), compiler_options=self.decode_options_for(b),
            out_shardings=(None, self.cache_shardings(b, s), None, None)))
        tok, cache, state, outs = fn(self.params, tokens, cache, state, jnp.int32(num_steps))
        if num_steps != max_steps:
            outs = jax.tree.map(lambda o: o[:num_steps], outs)
        return tok, cache, state, outs

    def select(self, cache, rows):
        """Cache rows reordered/replicated by ``rows`` (beam search, ``num_return_sequences``)."""
        rows = jnp.asarray(rows, jnp.int32)
        b, s = rows.shape[0], cache_len(cache)
        axis = 1 if self.stacked else 0

        def take(c, r):
            out = {"mask": c["mask"][r], "index": c["index"][r]}
            for name in ("k", "v"):
                if self.stacked:
                    out[name] = jnp.take(c[name], r, axis=axis)
                else:
                    out[name] = [x[r] for x in c[name]]
            return out

        fn = self._once(("select", b, s, cache_len(cache)), lambda: jax.jit(
            take, out_shardings=self.cache_shardings(b, s)))
        return fn(cache, rows)

    def insert(self, cache, prefix, slot: int):
        """Copy a one-row ``prefix`` cache (from :meth:`prefill` with batch 1, any length up
        to this cache's) into row ``slot`` of ``cache`` (donated): continuous batching."""
        b, s = cache["mask"].shape
        p = cache_len(prefix)
        if p > s:
            raise ValueError(f"prefix holds {p} positions; the cache only {s}")

        def put(c, pre, slot):
            def row(big, small, axis):
                pad = [(0, 0)] * small.ndim
                pad[axis + 1] = (0, s - p)
                small = jnp.pad(small, pad)
                return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot,
                                                           axis=axis)
            lax_axis = 1 if self.stacked else 0
            out = {"mask": row(c["mask"], pre["mask"], 0),
                   "index": jax.lax.dynamic_update_slice_in_dim(c["index"], pre["index"], slot, 0)}
            for name in ("k", "v"):
                if self.stacked:
                    out[name] = row(c[name], pre[name], lax_axis)
                else:
                    out[name] = [row(x, y, 0) for x, y in zip(c[name], pre[name], strict=True)]
            return out

        fn = self._once(("insert", b, s, p), lambda: jax.jit(
            put, donate_argnums=(0,), out_shardings=self.cache_shardings(b, s)))
        return fn(cache, prefix, jnp.int32(slot))

    # Paged KV cache (the serving engine) ---------------------------------------------------
    def pool_shardings(self, num_blocks: int, block_size: int) -> dict:
        """Shardings of ``model.init_pools``' K/V pools (heads split like the weights)."""
        a, d = self.cfg.num_attention_heads, self.cfg.head_dim
        shape = (a, num_blocks, block_size, d)
        if self.stacked:
            kv = self.sharding(POOL_AXES["stacked"],
                               (self.cfg.num_hidden_layers, *shape))
        else:
            kv = [self.sharding(POOL_AXES["layer"], shape)] * self.cfg.num_hidden_layers
        return {"k": kv, "v": kv}

    def init_pools(self, num_blocks: int, block_size: int) -> dict:
        """Empty paged K/V pools on this mesh (``model.init_pools``)."""
        return self._once(("pools", num_blocks, block_size), lambda: jax.jit(
            functools.partial(M.init_pools, self.cfg, num_blocks, block_size, self.dtype,
                              self.stacked),
            out_shardings=self.pool_shardings(num_blocks, block_size)))()

    def paged_run(self, fn: Callable, inputs, pools):
        """``fn(params, inputs, pools, lookup, decode_attention) -> (outputs, pools)`` (pure
        JAX around ``model.paged_forward``) jitted on this mesh, the pools donated and kept in
        their shardings.  ``fn`` must be the same object across calls (it keys the compile
        cache; new input shapes compile as usual)."""
        leaf = jax.tree.leaves(pools["k"])[0]
        num_blocks, block_size = int(leaf.shape[-3]), int(leaf.shape[-2])

        attention = self.paged_decode_attention(block_size)

        def make():
            return jax.jit(lambda p, x, c: fn(p, x, c, self.embed_lookup, attention),
                           donate_argnums=(2,), compiler_options=self.decode_options,
                           out_shardings=(None, self.pool_shardings(num_blocks, block_size)))

        return self._once(("paged", fn, num_blocks, block_size), make)(self.params, inputs,
                                                                        pools)

    def paged_decode_attention(self, block_size: int) -> Callable | None:
        """``decode_attention`` of ``model.paged_forward`` on this mesh: JAX's Pallas
        paged-attention op (``optkit.kernels.paged_attention``) on GPUs where ``kernels``
        allows the attention kernel (``auto``, ``pallas``, ``attention``; off GPUs only by
        name, through the interpreter) and the shapes suit it, else None (XLA's gather).
        Split over the devices as the rules split the pools' heads."""
        def make():
            names = self.kernels.split(",")
            explicit = self.kernels == "pallas" or "attention" in names
            if not (explicit or self.kernels == "auto" and self.gpu):
                return None
            try:
                from optkit.kernels import paged_attention as kernel
            except ImportError as e:
                if explicit:
                    raise ValueError(f"kernels={self.kernels!r}: Pallas' paged attention is "
                                     f"unavailable in this JAX ({e})") from e
                return None
            if not kernel.supported(self.cfg.head_dim, block_size):
                if explicit:
                    raise ValueError(f"kernels={self.kernels!r}: paged attention needs a "
                                     "power-of-two head size and block size >= 16")
                return None
            call = functools.partial(kernel.paged_decode_attention,
                                     scale=self.cfg.head_dim ** -0.5, interpret=not self.gpu)
            if self.mesh.devices.size == 1:
                return call
            pool = partition_spec(POOL_AXES["layer"], (self.cfg.num_attention_heads, 1,
                                                       block_size, self.cfg.head_dim),
                                  self.rules, self.mesh)
            q = PartitionSpec(None, pool[0], None)
            return jax.shard_map(call, mesh=self.mesh, check_vma=False,
                                 in_specs=(q, pool, pool, PartitionSpec(), PartitionSpec()),
                                 out_specs=q)

        return self._once(("paged_attention", block_size), make)


#: Logical axes of the paged K/V pools (``model.init_pools``): per layer (A, blocks, bs, D).
#: Under data parallelism every replica holds the whole pool (blocks are not split).
POOL_AXES = {
    "layer": ("heads", None, None, "head_dim"),
    "stacked": ("layers", "heads", None, None, "head_dim"),
}


def cache_len(cache) -> int:
    """Number of positions a cache holds (a model cache or a pipeline executor's)."""
    if "stages" in cache:
        cache = cache["stages"][0][0]
    return int(cache["mask"].shape[1])
