"""Pure-JAX OPT decoder over a KV cache.

The model knows nothing of devices or sharding: every function here takes a params pytree
and arrays, and returns arrays.  Parallel strategies (``optkit.parallel``) decide where the
arrays live; ``optkit.generate`` runs the sampling loop outside.

Params pytree (kernels are stored (in, out), i.e. transposed from the torch layout)::

    embed_tokens     (V, E)          token embedding, tied to the LM head
    embed_positions  (max_pos+2, H)  learned positions (row 1 = pad, first token at row 2)
    project_in       (E, H)          only when E != H (opt-350m)
    project_out      (H, E)          only when E != H
    final_ln         {scale, bias}   only for pre-LN models with a final LayerNorm
    layers[i]        attn_ln {scale, bias}, qkv {kernel (H, 3, A, D), bias (3, A, D)},
                     out {kernel (A, D, H), bias (H,)}, mlp_ln {scale, bias},
                     fc1 {kernel (H, F), bias (F,)}, fc2 {kernel (F, H), bias (H,)}

``layers`` is a Python list, unrolled in the compiled step (separate per-layer arrays are
what lets a decode step read the weights at close to the memory bandwidth).

KV cache pytree::

    k, v    per layer (B, S, A, D), a list
    mask    (B, S) bool             which cache positions hold real tokens
    index   (B,) int32              next write position of each row
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optkit.config import OPTConfig

Params = dict
Cache = dict


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
def init_cache(cfg: OPTConfig, batch: int, max_len: int, dtype=jnp.float32,
               num_layers: int | None = None) -> Cache:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` positions."""
    n = cfg.num_hidden_layers if num_layers is None else num_layers
    shape = (batch, max_len, cfg.num_attention_heads, cfg.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(n)],
        "v": [jnp.zeros(shape, dtype) for _ in range(n)],
        "mask": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((batch,), jnp.int32),
    }


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    # One pass over x for both moments (E[x], E[x^2]) in fp32: a single reduction kernel.
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(xf).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


class MatVec(NamedTuple):
    """An int8 product hook: ``fn(x, q, scale, bias, relu)`` -> the finished output in x's
    dtype (e.g. a kernel), used for products of at most ``max_rows`` token rows."""

    fn: Callable
    max_rows: int = 1


def project(p: dict, x: jax.Array, eq: str, matvec: MatVec | None = None, relu: bool = False,
            bias: bool = True) -> jax.Array:
    """``einsum(eq, x, kernel) + bias`` (then ReLU if ``relu``), ``eq`` naming the kernel's
    input axes first; ``bias=False`` leaves the bias to the caller.

    An int8 weight-only kernel (``kernel_q``, output-major, one scale per output channel; see
    ``optkit.quant``) is widened inside the product and scaled after it, so only the int8
    bytes are read: for a single row as one fused multiply + reduction over the input axes
    (each output's weights contiguous), else as a dot.  A ``matvec`` hook replaces both for
    products of up to its ``max_rows`` rows.
    """
    b = p["bias"] if bias else None
    if "kernel_q" not in p:
        y = jnp.einsum(eq, x, p["kernel"])
        y = y if b is None else y + b
        return jax.nn.relu(y) if relu else y
    q, scale = p["kernel_q"], p["kernel_scale"]
    n_out = scale.ndim
    n_in = q.ndim - n_out
    lead = x.shape[:x.ndim - n_in]
    rows = math.prod(lead)
    if matvec is not None and rows <= matvec.max_rows:
        return matvec.fn(x, q, scale, b, relu)
    if rows == 1:
        xb = x.astype(jnp.float32).reshape(lead + (1,) * n_out + x.shape[x.ndim - n_in:])
        y = jnp.sum(xb * q.astype(jnp.float32), axis=tuple(range(-n_in, 0)))
    else:
        operands, out = eq.split("->")
        lhs, rhs = operands.split(",")
        y = jnp.einsum(f"{lhs},{rhs[n_in:]}{rhs[:n_in]}->{out}", x, q.astype(x.dtype),
                       preferred_element_type=jnp.float32)
    y = (y * scale).astype(x.dtype)
    y = y if b is None else y + b
    return jax.nn.relu(y) if relu else y


def dense(p: dict, x: jax.Array, matvec: MatVec | None = None, relu: bool = False,
          bias: bool = True) -> jax.Array:
    return project(p, x, "...i,io->...o", matvec, relu, bias)


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """HF/metaseq position rows: the k-th real token uses row k + 2, pads use row 1."""
    mask = attention_mask.astype(jnp.int32)
    pos = (jnp.cumsum(mask, axis=-1) + start) * mask + 1
    return pos


def embed(params: Params, cfg: OPTConfig, tokens: jax.Array, positions: jax.Array,
          lookup=None) -> jax.Array:
    """Token + position embeddings; ``lookup(table, ids)`` replaces the token rows' take
    (e.g. one placed for a table split over devices)."""
    x = (lookup or _take_rows)(params["embed_tokens"], tokens)
    if cfg.has_projections:
        x = jnp.matmul(x, params["project_in"])
    return x + jnp.take(params["embed_positions"], positions, axis=0).astype(x.dtype)


def _take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take(table, ids, axis=0)


def unembed(params: Params, cfg: OPTConfig, x: jax.Array) -> jax.Array:
    """Final LayerNorm / projection and the tied LM head: hidden states -> logits."""
    if cfg.has_final_layer_norm:
        x = layer_norm(params["final_ln"], x, cfg.layer_norm_eps)
    if cfg.has_projections:
        x = jnp.matmul(x, params["project_out"])
    return jnp.einsum("...e,ve->...v", x, params["embed_tokens"])


def _attention(q, k, v, allowed, scale):
    """q (B,T,A,D), k/v (B,S,A,D), allowed (B,T,S) bool -> (B,T,A,D).

    Softmax in fp32, normalized after the PV product: the exponentials feed the product
    directly (XLA fuses them into its reduction instead of materializing a (B,S,A,D) temp).
    """
    scores = jnp.einsum("btad,bsad->bats", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    total = e.sum(-1)  # (B,A,T)
    out = jnp.einsum("bats,bsad->btad", e.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / jnp.transpose(total, (0, 2, 1))[..., None]).astype(v.dtype)


def _write_rows(cache: jax.Array, rows: jax.Array, index: jax.Array, new: jax.Array) -> jax.Array:
    """cache[b, index[b]] = new[b] for every row (B,S,...) <- (B,...): one in-place scatter."""
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(1, new.ndim)), inserted_window_dims=(0, 1),
        scatter_dims_to_operand_dims=(0, 1))
    idx = jnp.stack([rows, index], axis=-1).astype(jnp.int32)
    return jax.lax.scatter(cache, idx, new.astype(cache.dtype), dims, indices_are_sorted=True,
                           unique_indices=True,
                           mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _layer(lp: dict, cfg: OPTConfig, x: jax.Array, attend,
           matvec: dict | None = None) -> tuple[jax.Array, tuple]:
    """One decoder layer on hidden states ``x`` -> (x, new_kv).  ``attend(qkv) -> (out,
    new_kv)`` hides prefill vs decode; ``matvec`` maps kernel names (qkv, out, fc1, fc2) to
    int8 product hooks (see :func:`project`)."""
    eps = cfg.layer_norm_eps
    mv = matvec or {}
    if not cfg.do_layer_norm_before:  # post-LN (opt-350m)
        a, new_kv = attend(project(lp["qkv"], x, "bth,hkad->btkad", mv.get("qkv")))
        h = layer_norm(lp["attn_ln"], x + project(lp["out"], a, "btad,adh->bth",
                                                  mv.get("out")), eps)
        m = dense(lp["fc2"], dense(lp["fc1"], h, mv.get("fc1"), relu=True), mv.get("fc2"))
        return layer_norm(lp["mlp_ln"], h + m, eps), new_kv
    h = layer_norm(lp["attn_ln"], x, eps)
    a, new_kv = attend(project(lp["qkv"], h, "bth,hkad->btkad", mv.get("qkv")))
    x = x + project(lp["out"], a, "btad,adh->bth", mv.get("out"))
    m = layer_norm(lp["mlp_ln"], x, eps)
    x = x + dense(lp["fc2"], dense(lp["fc1"], m, mv.get("fc1"), relu=True), mv.get("fc2"))
    return x, new_kv


def _run_layers(layers, cfg: OPTConfig, x, ks, vs, make_attend, matvec=None):
    """Apply every layer, threading per-layer caches."""
    new_k, new_v = [], []
    for lp, k_c, v_c in zip(layers, ks, vs, strict=True):
        x, (k_n, v_n) = _layer(lp, cfg, x, make_attend(k_c, v_c), matvec)
        new_k.append(k_n)
        new_v.append(v_n)
    return x, new_k, new_v


# ---------------------------------------------------------------------------------------------
# Prefill / decode, split into stages so pipeline parallelism can run each on its own devices
# ---------------------------------------------------------------------------------------------
def prefill_layers(layers, cfg: OPTConfig, x: jax.Array, attention_mask: jax.Array,
                   cache: Cache) -> tuple[jax.Array, Cache]:
    """Run a prompt's hidden states ``x`` (B,T,H) through ``layers``; write K/V at [0, T)."""
    t = x.shape[1]
    mask = attention_mask.astype(bool)
    causal = jnp.tril(jnp.ones((t, t), bool))
    allowed = causal[None] & mask[:, None, :]
    scale = cfg.head_dim ** -0.5

    def make_attend(k_c, v_c):
        def attend(qkv):
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            out = _attention(q, k, v, allowed, scale)
            k_n = jax.lax.dynamic_update_slice_in_dim(k_c, k.astype(k_c.dtype), 0, axis=1)
            v_n = jax.lax.dynamic_update_slice_in_dim(v_c, v.astype(v_c.dtype), 0, axis=1)
            return out, (k_n, v_n)
        return attend

    x, ks, vs = _run_layers(layers, cfg, x, cache["k"], cache["v"], make_attend)
    cache_mask = jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros_like(cache["mask"]), mask, 0, axis=1)
    index = jnp.full_like(cache["index"], t)
    return x, {"k": ks, "v": vs, "mask": cache_mask, "index": index}


def dense_decode_attention(qkv: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           index: jax.Array, live: int, scale: float):
    """One new position per row: write its K/V (``qkv`` (B,3,A,D)) into k/v (B,S,A,D) at
    ``index`` (B,), then attend its query over the first ``live`` positions that ``mask``
    (B,S) allows.  Returns (out (B,A,D), k, v)."""
    rows = jnp.arange(qkv.shape[0])
    # callers keep index < cache length, so no out-of-bounds handling is needed
    k = _write_rows(k, rows, index, qkv[:, 1])
    v = _write_rows(v, rows, index, qkv[:, 2])
    k_l, v_l = (k, v) if live == k.shape[1] else (k[:, :live], v[:, :live])
    return _attention(qkv[:, None, 0], k_l, v_l, mask[:, None, :live], scale)[:, 0], k, v


def decode_layers(layers, cfg: OPTConfig, x: jax.Array, cache: Cache,
                  live: int | None = None, attention=None,
                  matvec=None) -> tuple[jax.Array, Cache]:
    """Run one new position per row (x: (B,1,H)) through ``layers``, writing at ``index``.

    ``live`` (static) promises every row's index is below it: attention then reads only the
    first ``live`` cache positions instead of the whole cache.  ``attention`` replaces
    :func:`dense_decode_attention` (same signature), e.g. with a fused kernel; ``matvec``
    maps kernel names to int8 product hooks (see :func:`project`).
    """
    b, s = cache["mask"].shape
    live = s if live is None else min(int(live), s)
    attention = attention or dense_decode_attention
    # A row whose index ran past the cache (an idle serving slot that keeps stepping) keeps
    # overwriting its last position instead of writing out of bounds.
    index = jnp.minimum(cache["index"], s - 1)
    mask = _write_rows(cache["mask"], jnp.arange(b), index, jnp.ones((b,), bool))
    scale = cfg.head_dim ** -0.5

    def make_attend(k_c, v_c):
        def attend(qkv):
            out, k_n, v_n = attention(qkv[:, 0], k_c, v_c, mask, index, live, scale)
            return out[:, None], (k_n, v_n)
        return attend

    x, ks, vs = _run_layers(layers, cfg, x, cache["k"], cache["v"], make_attend, matvec)
    return x, {"k": ks, "v": vs, "mask": mask, "index": cache["index"] + 1}


def prefill(params: Params, cfg: OPTConfig, tokens: jax.Array, attention_mask: jax.Array,
            cache: Cache, all_logits: bool = True, lookup=None) -> tuple[jax.Array, Cache]:
    """Process left-padded prompts ``tokens`` (B,T) into an empty ``cache``.

    Returns logits (B,T,V) (or (B,V) for the last position when ``all_logits=False``);
    ``lookup``: see :func:`embed`.
    """
    x = embed(params, cfg, tokens, positions_from_mask(attention_mask), lookup)
    x, cache = prefill_layers(params["layers"], cfg, x, attention_mask, cache)
    if not all_logits:
        x = x[:, -1]
    return unembed(params, cfg, x), cache


def decode_positions(cache: Cache) -> jax.Array:
    """Position rows of the next token of each row: (number of real tokens so far) + 2."""
    return (cache["mask"].sum(-1).astype(jnp.int32) + 2)[:, None]


def decode_step(params: Params, cfg: OPTConfig, tokens: jax.Array, cache: Cache,
                live: int | None = None, attention=None, matvec=None,
                lookup=None) -> tuple[jax.Array, Cache]:
    """Feed one token per row (B,) and return next-token logits (B,V) and the new cache
    (``attention``, ``matvec``: see :func:`decode_layers`; ``lookup``: :func:`embed`)."""
    x = embed(params, cfg, tokens[:, None], decode_positions(cache), lookup)
    x, cache = decode_layers(params["layers"], cfg, x, cache, live, attention, matvec)
    return unembed(params, cfg, x[:, 0]), cache


def forward(params: Params, cfg: OPTConfig, tokens: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits (B,T,V) of a full sequence without keeping a cache."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    dtype = params["embed_tokens"].dtype
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], dtype)
    logits, _ = prefill(params, cfg, tokens, attention_mask, cache)
    return logits


# ---------------------------------------------------------------------------------------------
# Paged KV cache (the serving engine): blocks of positions in one pool per layer
# ---------------------------------------------------------------------------------------------
def init_pools(cfg: OPTConfig, num_blocks: int, block_size: int, dtype=jnp.float32,
               num_layers: int | None = None) -> dict:
    """Empty K and V pools: per layer (A, num_blocks, block_size, D) (heads first, so tensor
    parallelism splits them like the weights)."""
    n = cfg.num_hidden_layers if num_layers is None else num_layers
    shape = (cfg.num_attention_heads, num_blocks, block_size, cfg.head_dim)
    return {"k": [jnp.zeros(shape, dtype) for _ in range(n)],
            "v": [jnp.zeros(shape, dtype) for _ in range(n)]}


def write_pool(pool: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """pool (A, NB, bs, D) with token rows ``new`` (N, A, D) stored at flat positions
    ``slots`` (N,) = block * bs + offset; a negative slot (padding) writes nothing.  The
    other slots must differ from each other (every token has its own place): the scatter
    is told its indices are unique, which lets it write them in parallel."""
    a, nb, bs, d = pool.shape
    flat = pool.reshape(a, nb * bs, d)
    index = jnp.where(slots < 0, nb * bs, slots)  # out of bounds: dropped
    flat = flat.at[:, index].set(jnp.swapaxes(new, 0, 1).astype(pool.dtype), mode="drop",
                                 unique_indices=True)
    return flat.reshape(a, nb, bs, d)


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, tables: jax.Array,
                    q_index: jax.Array, scale: float) -> jax.Array:
    """Causal attention through block tables.  q (R,T,A,D); pools (A, NB_pool, bs, D);
    tables (R,NB) the first NB blocks of each row's sequence; q_index (R,T) each query's
    position in its sequence (it attends positions [0, q_index]).  -> (R,T,A,D).

    Reads R x NB blocks: a step's cost follows the bucketed live length, not the pool."""
    a, _, bs, d = k_pool.shape
    r, nb = tables.shape
    k = k_pool[:, tables].reshape(a, r, nb * bs, d)
    v = v_pool[:, tables].reshape(a, r, nb * bs, d)
    scores = jnp.einsum("rtad,arsd->rats", q, k, preferred_element_type=jnp.float32) * scale
    allowed = jnp.arange(nb * bs)[None, None, :] <= q_index[:, :, None]
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    total = e.sum(-1)  # (R,A,T)
    out = jnp.einsum("rats,arsd->rtad", e.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / jnp.swapaxes(total, 1, 2)[..., None]).astype(v.dtype)


def paged_forward(params: Params, cfg: OPTConfig, tokens: jax.Array, positions: jax.Array,
                  slots: jax.Array, groups, pools: dict, lookup=None,
                  decode_attention=None, chunk_attention=None) -> tuple[jax.Array, dict]:
    """New tokens of several sequences through every layer over paged K/V pools.

    ``tokens``, ``positions`` (each token's index in its sequence) and ``slots`` (where its
    K/V go: block * block_size + offset; negative for padding) are flat (N,).  ``groups``
    splits them, in order, into rows of equal length: a sequence of (tables (R,NB),
    q_index (R,T)), R*T tokens each (decodes: T = 1; prompt chunks continuing the sequences
    whose earlier tokens are already in their blocks: T > 1).  Each layer first writes the
    new K/V, then every token attends over its sequence up to itself.
    ``decode_attention(q (R,A,D), k_pool, v_pool, tables, lengths (R,)) -> (R,A,D)``
    replaces :func:`paged_attention` for T = 1 groups (e.g. a GPU kernel), and
    ``chunk_attention(q (R,T,A,D), k_pool, v_pool, tables, q_index) -> (R,T,A,D)`` for
    T > 1 groups; ``lookup``: see :func:`embed`.  Returns hidden states (N,H) after the
    last layer (:func:`unembed` them where logits are wanted) and the new pools.
    """
    x = embed(params, cfg, tokens[None], positions[None] + 2, lookup)
    scale = cfg.head_dim ** -0.5

    def make_attend(k_c, v_c):
        def attend(qkv):
            qkv = qkv[0]  # (N,3,A,D)
            k_n = write_pool(k_c, slots, qkv[:, 1])
            v_n = write_pool(v_c, slots, qkv[:, 2])
            outs, start = [], 0
            for tables, q_index in groups:
                r, t = q_index.shape
                q = qkv[start:start + r * t, 0]
                start += r * t
                if t == 1 and decode_attention is not None:
                    o = decode_attention(q, k_n, v_n, tables, q_index[:, 0] + 1)
                else:
                    chunk = chunk_attention if t > 1 and chunk_attention is not None else \
                        functools.partial(paged_attention, scale=scale)
                    o = chunk(q.reshape(r, t, *q.shape[1:]), k_n, v_n, tables, q_index)
                outs.append(o.reshape(r * t, *q.shape[1:]))
            out = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
            return out[None], (k_n, v_n)
        return attend

    x, ks, vs = _run_layers(params["layers"], cfg, x, pools["k"], pools["v"], make_attend)
    return x[0], {"k": ks, "v": vs}
