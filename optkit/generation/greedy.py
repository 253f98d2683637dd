"""Greedy decoding on the jitted KV-cache loop (the foundation's minimal ``generate``)."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from optkit.parallel.executor import MeshExecutor


def _greedy_step(logits, state):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, state, tok


def greedy(executor: MeshExecutor, input_ids: np.ndarray, attention_mask: np.ndarray,
           max_new_tokens: int, eos_token_id: int | None = None, pad_token_id: int = 1,
           on_token: Callable[[np.ndarray], None] | None = None,
           steps_per_dispatch: int = 8) -> np.ndarray:
    """Left-padded prompts (B,T) -> (B, T + n) tokens; finished rows are padded."""
    b, t = input_ids.shape
    if max_new_tokens <= 0:
        return np.asarray(input_ids)
    cache = executor.init_cache(b, t + max_new_tokens)
    logits, cache = executor.prefill(input_ids, attention_mask, cache)
    tok = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    out = [tok]
    done = np.zeros(b, bool) if eos_token_id is None else tok == eos_token_id
    if on_token:
        on_token(tok)
    remaining = max_new_tokens - 1
    cur = tok
    while remaining > 0 and not done.all():
        n = min(steps_per_dispatch, remaining)
        cur, cache, _, toks = executor.decode_loop(_greedy_step, cur, cache, (), n,
                                                    live=t + max_new_tokens - remaining + n)
        toks = np.asarray(toks)  # (n, B)
        for row in toks:
            row = np.where(done, pad_token_id, row)
            out.append(row)
            if on_token:
                on_token(row)
            if eos_token_id is not None:
                done |= row == eos_token_id
            remaining -= 1
            if done.all():
                break
    return np.concatenate([np.asarray(input_ids), np.stack(out, 1)], axis=1)
