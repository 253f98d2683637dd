"""HF-style generation on any executor: greedy, sampling, beam search, stop strings, streaming.

``generate(executor, input_ids, attention_mask, **kwargs)`` takes transformers' keyword
names with their meanings (see :mod:`optkit.generation.config`) and returns the sequences,
or a :class:`GenerateOutput` with ``return_dict_in_generate=True``.  The executor is any
object with ``cfg``, ``init_cache``, ``prefill``, ``decode_loop`` and ``select`` (the cache
stays opaque), so the same code drives one device, a mesh, or a pipeline.
:func:`generate_text` works on strings: prompts in, completions (stop strings cut off) and
finish reasons out, with optional streaming of text.

Modules: ``config`` (arguments), ``processors`` (logits processors), ``sampling`` (per-row
temperature / top-k / top-p), ``search`` (greedy and sampling loop), ``beam`` (beam search),
``stop`` (stop strings), ``text`` (strings in and out), ``output`` (the result type).
"""

from __future__ import annotations

import numpy as np

from optkit.generation.config import SUPPORTED, GenerationConfig, resolve
from optkit.generation.output import GenerateOutput

__all__ = ["SUPPORTED", "GenerateOutput", "GenerationConfig", "check_inputs", "generate",
           "generate_text"]


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
        from optkit.generation.beam import beam_search

        out = beam_search(executor, ids, mask, gc)
    else:
        from optkit.generation.search import search

        out = search(executor, ids, mask, gc)
    return out if gc.return_dict_in_generate else out.sequences


def generate_text(model, tokenizer=None, prompts=(), **kwargs):
    """Strings in, :class:`~optkit.generation.text.Completion` objects out (see there)."""
    from optkit.generation.text import generate_text as run

    return run(model, tokenizer, prompts, **kwargs)
