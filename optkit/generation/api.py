"""``generate``: checks a left-padded batch of token ids and runs greedy / sampled search or
beam search on it."""

from __future__ import annotations

import numpy as np

from optkit.generation.beam import beam_search
from optkit.generation.config import resolve
from optkit.generation.search import search


def check_inputs(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) int32 ids and mask of a left-padded batch, or a clear error."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length > 0; got {ids.shape}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
    mask = (mask != 0).astype(np.int32)
    if not mask[:, -1].all():
        rows = np.flatnonzero(mask[:, -1] == 0).tolist()
        raise ValueError(f"rows {rows} end in padding: decoder-only generation needs "
                         "left padding (tokenizer.padding_side = 'left')")
    return ids.astype(np.int32), mask


def generate(executor, input_ids, attention_mask=None, **kwargs):
    """Continue left-padded prompts ``input_ids`` (B, T).

    Returns (B * num_return_sequences, T + n) token ids (rows that end early are padded with
    ``pad_token_id``), or a :class:`GenerateOutput` when ``return_dict_in_generate=True``.
    Besides transformers' arguments: ``seed`` (sampling), ``stop`` (= ``stop_strings``;
    decoded with ``tokenizer``, optkit's own by default), ``on_token(tokens)`` (called with
    each step's (N,) tokens, in order, as they reach the host), ``output_logprobs`` /
    ``top_logprobs`` and ``steps_per_dispatch`` (decode steps per device call, default 8).
    """
    ids, mask = check_inputs(input_ids, attention_mask)
    gc = resolve(executor.cfg, ids.shape[1], **kwargs)
    if gc.num_beams > 1:
        out = beam_search(executor, ids, mask, gc)
    else:
        out = search(executor, ids, mask, gc)
    return out if gc.return_dict_in_generate else out.sequences
