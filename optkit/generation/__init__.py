"""Decoding loops over an executor: greedy, sampling, beam search, streaming callbacks."""

from __future__ import annotations

import numpy as np

from optkit.generation.greedy import greedy


def generate(executor, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
             max_length: int | None = None, max_new_tokens: int | None = None,
             do_sample: bool = False, eos_token_id: int | None = None,
             pad_token_id: int | None = None, on_token=None, **kwargs) -> np.ndarray:
    """Greedy decoding with HF argument names (``max_length`` counts the prompt)."""
    if kwargs:
        raise TypeError(f"generate() got unsupported arguments: {sorted(kwargs)}")
    if do_sample:
        raise NotImplementedError("sampling is not implemented yet; use do_sample=False")
    cfg = executor.cfg
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    t = input_ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = (max_length if max_length is not None else 20) - t
    elif max_length is not None:
        raise ValueError("pass max_length or max_new_tokens, not both")
    if t + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({t}) + new tokens ({max_new_tokens}) exceed the model's "
                         f"{cfg.max_position_embeddings} positions")
    return greedy(executor, input_ids, attention_mask, max(max_new_tokens, 0),
                  eos_token_id=cfg.eos_token_id if eos_token_id is None else eos_token_id,
                  pad_token_id=cfg.pad_token_id if pad_token_id is None else pad_token_id,
                  on_token=on_token)
