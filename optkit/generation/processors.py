"""HF transformers' logits processors as pure JAX functions over a fixed-size token history.

Each decoding row keeps its whole sequence so far (left-padded prompt, then generated tokens)
in ``hist`` (N, L); ``cur`` is the number of valid columns (the same for every row, as in
HF, whose ``input_ids`` grow by one column per step).  The processors and their order follow
``GenerationMixin._get_logits_processor``:

1. repetition penalty (prompt and generated tokens, left padding ignored as HF 5 does),
2. ``no_repeat_ngram_size`` (n-grams over the whole padded sequence, as HF),
3. ``bad_words_ids`` (a banned sequence's last token is removed when its prefix just occurred),
4. ``min_length`` / ``min_new_tokens`` (EOS removed while the sequence is shorter).

The static part (:class:`Processors`) is hashable so the step functions built from it are
cached; the values that may change between calls (penalty, minimum length, where each row's
prompt starts) are arrays in the loop state (:func:`processor_state`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Processors:
    """Which processors run (static: changing these compiles a new step function)."""

    repetition: bool = False
    ngram: int = 0
    bad_words: tuple[tuple[int, ...], ...] = ()


def processor_state(attention_mask: np.ndarray, penalty: float, min_length: int,
                    eos: tuple[int, ...]) -> dict:
    """Dynamic processor inputs: per-row first real prompt column, penalty, minimum length
    and the EOS ids (only their number is static)."""
    first_real = np.argmax(np.asarray(attention_mask) != 0, axis=1).astype(np.int32)
    return {"first_real": first_real, "penalty": np.float32(penalty),
            "min_length": np.int32(min_length), "eos": np.asarray(eos, np.int32).reshape(-1)}


def is_eos(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    """Whether each token is one of the EOS ids (``eos``: (n_eos,), possibly empty)."""
    return jnp.any(tokens[..., None] == eos, axis=-1)


def _banned_mask(n: int, v: int, tokens: jax.Array, where: jax.Array) -> jax.Array:
    """(N, V) bool: ``tokens[i, j]`` is marked for row i where ``where[i, j]``."""
    rows = jnp.arange(n)[:, None]
    idx = jnp.where(where, tokens, v)  # column V is a spare that absorbs the unmarked ones
    return jnp.zeros((n, v + 1), bool).at[rows, idx].set(True)[:, :v]


def repetition_penalty(scores, hist, cur, first_real, penalty):
    """Divide positive / multiply negative scores of every token already in the row."""
    n, v = scores.shape
    pos = jnp.arange(hist.shape[1])[None, :]
    seen = _banned_mask(n, v, hist, (pos < cur) & (pos >= first_real[:, None]))
    penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalized, scores)


def no_repeat_ngram(scores, hist, cur, size: int):
    """Ban tokens that would complete an n-gram already present in the row."""
    n, v = scores.shape
    length = hist.shape[1]
    width = length - size + 1
    if width <= 0:
        return scores
    windows = jnp.stack([hist[:, j:j + width] for j in range(size)], axis=1)  # (N, size, W)
    prefix = jax.lax.dynamic_slice_in_dim(hist, jnp.maximum(cur - size + 1, 0), size - 1, axis=1)
    match = jnp.all(windows[:, :-1, :] == prefix[:, :, None], axis=1)  # (N, W)
    starts = jnp.arange(width)[None, :]
    match &= starts + size <= cur  # only windows made of existing tokens
    banned = _banned_mask(n, v, windows[:, -1, :], match)
    return jnp.where(banned, NEG_INF, scores)


def bad_words(scores, hist, cur, sequences: tuple[tuple[int, ...], ...]):
    """Remove each banned sequence's last token where its prefix ends the row."""
    n, v = scores.shape
    banned = jnp.zeros((n, v), bool)
    for seq in sequences:
        last = seq[-1]
        if len(seq) == 1:
            banned = banned.at[:, last].set(True)
            continue
        m = len(seq) - 1
        tail = jax.lax.dynamic_slice_in_dim(hist, jnp.maximum(cur - m, 0), m, axis=1)
        hit = jnp.all(tail == jnp.asarray(seq[:-1], hist.dtype)[None, :], axis=1) & (m <= cur)
        banned = banned.at[:, last].set(banned[:, last] | hit)
    return jnp.where(banned, NEG_INF, scores)


def suppress_eos(scores, cur, min_length, eos):
    """EOS gets -inf while the sequence (prompt included) is shorter than ``min_length``."""
    eos_col = is_eos(jnp.arange(scores.shape[-1]), eos)
    return jnp.where(eos_col[None, :] & (cur < min_length), NEG_INF, scores)


def apply_processors(spec: Processors, scores, hist, cur, state: dict):
    """All enabled processors, in HF's order, on f32 ``scores`` (N, V)."""
    if spec.repetition:
        scores = repetition_penalty(scores, hist, cur, state["first_real"], state["penalty"])
    if spec.ngram:
        scores = no_repeat_ngram(scores, hist, cur, spec.ngram)
    if spec.bad_words:
        scores = bad_words(scores, hist, cur, spec.bad_words)
    return suppress_eos(scores, cur, state["min_length"], state["eos"])
