"""Per-row sampling primitives (pure JAX, jittable): temperature, top-k, top-p, log-probs.

Every parameter is an array with one entry per row, so one batch can mix greedy and sampled
rows with different settings (the serving engine's sequences).  A row's draw for its i-th
generated token uses the key :func:`token_keys` derives from (seed, stream, i) alone, so the
same seed gives the same tokens through ``generate``, ``generate_text`` and the server,
whatever else is in the batch and however steps are grouped into dispatches.
Filtering follows HF transformers' warpers: temperature, then top-k, then top-p (a token is
kept while the probability mass ranked strictly above it is below ``top_p``; at least one
token always survives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, min_keep: int = 1) -> jax.Array:
    """Scaled and filtered logits (B,V) f32; filtered-out entries are -inf.

    ``temperature`` <= 0 means greedy (no scaling here), ``top_k`` <= 0 or >= V means no
    top-k, ``top_p`` >= 1 means no top-p.  ``min_keep`` (static) tokens always survive both
    filters (HF's ``min_tokens_to_keep``; beam sampling keeps one more than the EOS count).
    """
    x = logits.astype(jnp.float32)
    v = x.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    x = x / t[:, None]
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < v), jnp.maximum(top_k, min_keep), v).astype(jnp.int32)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    rank = jnp.arange(v)[None, :]
    desc = jnp.where(rank < k[:, None], desc, NEG_INF)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass ranked strictly above each entry
    keep = (before < top_p[:, None]) | (rank < min_keep)
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.maximum(cutoff, kth)
    return jnp.where(x < cutoff, NEG_INF, x)


def token_keys(seeds: jax.Array, streams: jax.Array, counts: jax.Array) -> jax.Array:
    """(B,) PRNG keys: row r's key for generated token ``counts[r]`` of stream
    ``streams[r]`` (the sequence's index within its request: ``num_return_sequences`` /
    ``n``) under ``seeds[r]``."""
    def one(seed, stream, count):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), count)

    return jax.vmap(one)(seeds.astype(jnp.uint32), streams.astype(jnp.uint32),
                         counts.astype(jnp.uint32))


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """Next token per row (B,) int32: argmax where ``temperature`` <= 0, else a draw from
    softmax(filtered logits) with that row's key (``keys``: (B,) PRNG keys)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    drawn = jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def sample_tokens(logits: jax.Array, seeds: jax.Array, streams: jax.Array, counts: jax.Array,
                  temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The sampler of ``generate`` and the server: :func:`sample` with :func:`token_keys`,
    skipping work no row needs (only an argmax when every row is greedy, no sort over the
    vocabulary unless a sampled row uses top-k or top-p).  A row draws the same token
    whichever branch its batch takes."""
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = temperature > 0
    filtered = sampled & (((top_k > 0) & (top_k < v)) | (top_p < 1))

    def plain(_):
        x = logits.astype(jnp.float32) / jnp.where(sampled, temperature, 1.0)[:, None]
        keys = token_keys(seeds, streams, counts)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(sampled, drawn, greedy)

    def full(_):
        return sample(logits, token_keys(seeds, streams, counts), temperature, top_k, top_p)

    def unfiltered(_):
        return jax.lax.cond(sampled.any(), plain, lambda _: greedy, None)

    return jax.lax.cond(filtered.any(), full, unfiltered, None)


def logprobs(logits: jax.Array, tokens: jax.Array, num_top: int = 0):
    """Log-probability of ``tokens`` under softmax(logits), plus the ``num_top`` most likely
    (ids, log-probs).  Shapes: logits (..., V), tokens (...)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if num_top <= 0:
        return chosen, None, None
    top_lp, top_ids = jax.lax.top_k(lp, num_top)
    return chosen, top_ids, top_lp


def sample_without_replacement(logits: jax.Array, keys: jax.Array, num: int) -> jax.Array:
    """``num`` distinct indices per row (B, num), drawn one after another from softmax(logits)
    without replacement (the Gumbel-top-k trick; ``torch.multinomial(replacement=False)``'s
    distribution).  ``keys``: (B,) PRNG keys."""
    gumbel = jax.vmap(lambda k, x: jax.random.gumbel(k, x.shape, jnp.float32))(keys, logits)
    return jax.lax.top_k(logits.astype(jnp.float32) + gumbel, num)[1].astype(jnp.int32)
