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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optkit import model as M
from optkit.config import OPTConfig
from optkit.options import ModelOptions
from optkit.parallel.dispatch import settled
from optkit.parallel.kernels import on_gpus
from optkit.parallel.placement import Placement
from optkit.parallel.rules import Rules, axis_names
from optkit.parallel.transfer import move
from optkit.weights.layout import ParamSpec

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
#: with conditional nodes, NVIDIA/nccl#1986): a decode step is one graph (preferred to
#: all-reduces outside the graphs by measurement on Hopper GPUs, ``benchmarks/README.md``).
GPU_MULTI_DECODE_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES",
    "xla_gpu_graph_min_graph_size": 1,
    "xla_gpu_unsupported_use_all_reduce_one_shot_kernel": False,
}
#: ... added for an fp16/bf16 model's decode jits on GPUs where every device's products take
#: at least :data:`LARGE_BATCH_ROWS` rows: the products through cuBLASLt, whose epilogues
#: take the bias, ReLU and residual adds, instead of XLA's Triton GEMMs, which leave them to
#: four more kernels a layer.  That pays off from 64 rows a device; below, Triton's GEMMs are
#: faster (``benchmarks/README.md``, 'fp16 products through cuBLASLt from 64 rows').
#: int8 models keep the Triton GEMMs: they widen the weights inside the product.  (bf16
#: models take the same options; the measurements cover fp16.)
GPU_LARGE_BATCH_OPTIONS = {"xla_gpu_enable_triton_gemm": False,
                           "xla_gpu_enable_cublaslt": True}
LARGE_BATCH_ROWS = 64


def decode_graph_options(collectives: bool) -> dict:
    """The decode jits' XLA options on GPUs, for a step with or without ``collectives``."""
    return dict(GPU_MULTI_DECODE_OPTIONS if collectives else GPU_DECODE_OPTIONS)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    device = device or jax.devices()[0]
    return Mesh(np.array([device]).reshape(1, 1), ("data", "tensor"))


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

    ``options``: the model's :class:`~optkit.options.ModelOptions` (its ``kernels`` pick
    the decode step's Pallas kernels; default: those of ``auto``); ``command_buffers``
    (default: on GPUs) compiles the decode jits with :data:`GPU_MULTI_DECODE_OPTIONS` where
    weights are split over devices, else :data:`GPU_DECODE_OPTIONS`."""

    def __init__(self, cfg: OPTConfig, params: Any, mesh: Mesh | None = None,
                 rules: Rules | None = None, dtype=None, options: ModelOptions | None = None,
                 command_buffers: bool | None = None):
        self.cfg = cfg
        self.mesh = mesh or single_device_mesh()
        self.rules = dict(rules or {})
        self.place = Placement(cfg, self.mesh, self.rules)
        self.params = params
        self.dtype = jnp.dtype(dtype or jax.tree.leaves(params)[0].dtype)
        self._fns: dict[Any, Any] = {}
        if options is None:
            options = ModelOptions(quantize="int8" if self.int8 else None)
        if options.int8 != self.int8:
            raise ValueError(f"options.quantize={options.quantize!r}, but the model's weights "
                             f"are {'int8' if self.int8 else 'not int8'}")
        self.options = options
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

    # Shardings (see ``optkit.parallel.placement``) ---------------------------------------
    def param_sharding(self, spec: ParamSpec) -> NamedSharding:
        return self.place.param(spec)

    def cache_shardings(self, batch: int, max_len: int) -> dict:
        return self.place.cache(batch, max_len)

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        return self.place.batch(shape)

    def logits_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        return self.place.logits(shape)

    @property
    def embed_lookup(self) -> Callable | None:
        return self.place.embed_lookup

    @property
    def int8(self) -> bool:
        """Whether the model's matmul kernels are int8 (``optkit.quant``)."""
        layers = self.params["layers"]
        return "kernel_q" in (layers[0] if layers else {}).get("qkv", {})

    def decode_kernels(self, batch: int, max_len: int) -> dict:
        """Keyword arguments (``attention``, ``matvec``) of ``model.decode_step`` for this
        batch and cache (see ``optkit.parallel.kernels``)."""
        return self._once(("kernels", batch, max_len), lambda: self.place.decode_kernels(
            self.options.kernels, batch, max_len, self.int8, self.dtype))

    def put_batch(self, x) -> jax.Array:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return move(x, self.batch_sharding(tuple(x.shape)))

    # Cache ---------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        return self._once(("init", batch, max_len), lambda: jax.jit(
            functools.partial(M.init_cache, self.cfg, batch, max_len, self.dtype),
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
        """Up to ``num_steps`` decode steps in one dispatch.

        ``step_fn(logits, state) -> (next_tokens, state, out)`` is pure JAX (sampling, logits
        processors) and must be the same function object across calls (it keys the compile
        cache).  ``out`` leaves are stacked over steps.  The trip count is dynamic: one
        compilation serves every ``num_steps`` up to ``max_steps`` (default: the next power
        of two).  A dict ``state`` with a boolean ``done`` entry ends the loop on the device
        once every entry is true (the outs of steps not run are zeros).  ``live`` bounds
        every row's position after the dispatch (attention then reads only that much of
        the cache).  Returns (tokens, cache, state, outs).
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

            def body(carry):
                i, tok, c, st, outs = carry
                logits, c = M.decode_step(params, cfg, tok, c, n_live, lookup=lookup, **kern)
                tok, st, out = step_fn(logits, st)
                outs = jax.tree.map(
                    lambda buf, o: jax.lax.dynamic_update_index_in_dim(buf, o, i, 0), outs, out)
                return i + 1, tok, c, st, outs

            def more(carry):
                i, st = carry[0], carry[3]
                if isinstance(st, dict) and "done" in st:
                    return (i < n) & ~jnp.all(st["done"])
                return i < n

            _, *out = jax.lax.while_loop(more, body, (jnp.int32(0), tokens, cache, state, outs))
            return tuple(out)

        fn = self._once(("loop", step_fn, max_steps, b, s, n_live), lambda: jax.jit(
            run, donate_argnums=(2,), compiler_options=self.decode_options_for(b),
            out_shardings=(None, self.cache_shardings(b, s), None, None)))
        tok, cache, state, outs = fn(self.params, tokens, cache, state, jnp.int32(num_steps))
        if num_steps != max_steps:
            outs = jax.tree.map(lambda o: o[:num_steps], outs)
        return tok, cache, state, outs

    def dispatch_span(self, position: int, remaining: int, batch: int, max_len: int) -> int:
        """How many of ``remaining`` decode steps one :meth:`decode_loop` dispatch should run
        when the rows' next position is ``position``: all of them where attention reads only
        the positions each row has written (the fused kernel), else up to the end of the
        current :data:`LIVE_BUCKET` (attention reads the whole live bucket every step)."""
        if self.decode_kernels(batch, max_len)["attention"] is not None:
            return remaining
        return max(1, min(remaining, -(-(position + 1) // LIVE_BUCKET) * LIVE_BUCKET - position))

    def select(self, cache, rows):
        """Cache rows reordered/replicated by ``rows`` (beam search, ``num_return_sequences``)."""
        rows = jnp.asarray(rows, jnp.int32)
        b, s = rows.shape[0], cache_len(cache)

        def take(c, r):
            return {"mask": c["mask"][r], "index": c["index"][r],
                    "k": [x[r] for x in c["k"]], "v": [x[r] for x in c["v"]]}

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
            out = {"mask": row(c["mask"], pre["mask"], 0),
                   "index": jax.lax.dynamic_update_slice_in_dim(c["index"], pre["index"], slot, 0)}
            for name in ("k", "v"):
                out[name] = [row(x, y, 0) for x, y in zip(c[name], pre[name], strict=True)]
            return out

        fn = self._once(("insert", b, s, p), lambda: jax.jit(
            put, donate_argnums=(0,), out_shardings=self.cache_shardings(b, s)))
        return fn(cache, prefix, jnp.int32(slot))

    # Paged KV cache (the serving engine) ---------------------------------------------------
    def pool_shardings(self, num_blocks: int, block_size: int) -> dict:
        """Shardings of ``model.init_pools``' K/V pools (heads split like the weights)."""
        return self.place.pools(num_blocks, block_size)

    def init_pools(self, num_blocks: int, block_size: int) -> dict:
        """Empty paged K/V pools on this mesh (``model.init_pools``)."""
        return self._once(("pools", num_blocks, block_size), lambda: jax.jit(
            functools.partial(M.init_pools, self.cfg, num_blocks, block_size, self.dtype),
            out_shardings=self.pool_shardings(num_blocks, block_size)))()

    def paged_run(self, fn: Callable, inputs, pools, rows: int = 1):
        """``fn(params, inputs, pools, lookup, attention) -> (outputs, pools)`` (pure JAX
        around ``model.paged_forward``, ``attention`` its keyword arguments from
        :meth:`paged_attention`) jitted on this mesh, the pools donated and kept in their
        shardings.  ``fn`` must be the same object across calls (it keys the compile cache;
        new input shapes compile as usual).  ``rows``: the tokens a call feeds the model
        (they pick the XLA options, :meth:`decode_options_for`)."""
        return self._paged_jit(fn, pools, rows)(self.params, inputs, pools)

    def paged_compile(self, fn: Callable, inputs, pools, rows: int = 1) -> Callable[[], None]:
        """What compiles the program ``paged_run(fn, inputs, pools, rows)`` would run,
        without running it: a call that needs no lock, so several may compile in threads at
        once (the jitted function is made here, in the caller's thread)."""
        jitted = self._paged_jit(fn, pools, rows)
        # (where dispatch is synchronous, _once wrapped the jitted function)
        lower = (jitted if hasattr(jitted, "lower") else jitted.__wrapped__).lower
        return lambda: lower(self.params, inputs, pools).compile()

    def _paged_jit(self, fn: Callable, pools, rows: int) -> Callable:
        leaf = jax.tree.leaves(pools["k"])[0]
        num_blocks, block_size = int(leaf.shape[-3]), int(leaf.shape[-2])

        def make():  # once per row count: a dispatch with a known one does none of this
            attention = self.paged_attention(block_size)
            return jax.jit(lambda p, x, c: fn(p, x, c, self.embed_lookup, attention),
                           donate_argnums=(2,), compiler_options=self.decode_options_for(rows),
                           out_shardings=(None, self.pool_shardings(num_blocks, block_size)))

        return self._once(("paged", fn, num_blocks, block_size, rows), make)

    def paged_attention(self, block_size: int) -> dict[str, Callable]:
        """``decode_attention`` and ``chunk_attention`` of ``model.paged_forward`` on this
        mesh: optkit's Pallas kernels (``optkit.kernels.paged_attention``) on GPUs where
        ``kernels`` allows the attention kernel (``auto``, ``pallas``, ``attention``; off
        GPUs only by name, through the interpreter) and the shapes suit them, else {} (XLA's
        gather).  Split over the devices as the rules split the pools' heads."""
        def make():
            kernels = self.options.kernels
            explicit = kernels.required and kernels.wants("attention")
            if not (explicit or not kernels.required and self.gpu):
                return {}
            try:
                from optkit.kernels import paged_attention as kernel
            except ImportError as e:
                if explicit:
                    raise ValueError(f"kernels={str(kernels)!r}: Pallas' paged attention is "
                                     f"unavailable in this JAX ({e})") from e
                return {}
            if not kernel.supported(self.cfg.head_dim, block_size):
                if explicit:
                    raise ValueError(f"kernels={str(kernels)!r}: paged attention needs a "
                                     "power-of-two head size and block size >= 16")
                return {}
            calls = {name: functools.partial(f, scale=self.cfg.head_dim ** -0.5,
                                             interpret=not self.gpu)
                     for name, f in (("decode_attention", kernel.paged_decode_attention),
                                     ("chunk_attention", kernel.paged_chunk_attention))}
            if self.mesh.devices.size == 1:
                return calls
            pool = self.place.pool(1, block_size).spec
            q = {"decode_attention": PartitionSpec(None, pool[0], None),
                 "chunk_attention": PartitionSpec(None, None, pool[0], None)}
            return {name: jax.shard_map(call, mesh=self.mesh, check_vma=False,
                                        in_specs=(q[name], pool, pool, PartitionSpec(),
                                                  PartitionSpec()),
                                        out_specs=q[name])
                    for name, call in calls.items()}

        return self._once(("paged_attention", block_size), make)


def cache_len(cache) -> int:
    """Number of positions a cache holds (a model cache or a pipeline executor's)."""
    if "stages" in cache:
        cache = cache["stages"][0][0]
    return int(cache["mask"].shape[1])
