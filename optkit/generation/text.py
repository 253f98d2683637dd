"""Strings in, strings out: tokenize, generate, decode, cut at stop strings, stream text.

``generate_text(model, tokenizer, prompts, stop=..., on_text=..., **generate_kwargs)`` is
what notebooks and the CLI call.  Each row's tokens go through one
:class:`~optkit.generation.stream.TextStream` (the server's detokenizer): ``on_text(row,
delta)`` receives the row's text as it grows; a delta is never retracted, so text that could
still turn into a stop string (or an incomplete UTF-8 character) is held back until it is
safe, and a stop string is never streamed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from optkit.generation.api import generate
from optkit.generation.stream import HFCodec, TextStream


@dataclasses.dataclass
class Completion:
    """One generated continuation."""

    prompt: str
    text: str  # the continuation, without the stop string and what follows it
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: list[int]  # generated ids, the EOS / stop-string token included
    logprobs: list[float] | None = None  # per token, when output_logprobs=True


def generate_text(model, tokenizer=None, prompts: str | Sequence[str] = (), *,
                  stop: str | Sequence[str] | None = None,
                  on_text: Callable[[int, str], None] | None = None,
                  **kwargs) -> list[Completion]:
    """Complete ``prompts`` (one string or a list) with a JAX model or an executor.

    ``tokenizer`` defaults to optkit's embedded OPT tokenizer.  Other keyword arguments are
    :func:`optkit.generation.generate`'s.  Returns one :class:`Completion` per prompt (times
    ``num_return_sequences``, row ``i * r + j`` continuing prompt ``i``).
    """
    from optkit.weights.tokenizer import get_tokenizer

    executor = getattr(model, "executor", model)
    if not hasattr(executor, "decode_loop"):
        raise TypeError(f"generate_text needs a JAX model (get_model('jax/...') or "
                        f"'alpa/...') or an executor, got {type(model).__name__}")
    for name in ("return_dict_in_generate", "stop_strings", "tokenizer", "on_token"):
        if name in kwargs:
            raise TypeError(f"generate_text sets {name} itself; use stop= / on_text=")
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="np", padding=True)
    finally:
        tok.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    r = kwargs.get("num_return_sequences") or 1
    codec = HFCodec(tok)
    streams = [TextStream(codec, stops) for _ in range(len(prompts) * r)]

    def on_token(tokens: np.ndarray) -> None:  # finished rows get pad (special) tokens
        for row, t in enumerate(tokens):
            streams[row].add(t)
            delta = streams[row].release()
            if delta:
                on_text(row, delta)

    out = generate(executor, ids, mask, stop=stops or None, tokenizer=tok,
                   return_dict_in_generate=True, on_token=on_token if on_text else None,
                   **kwargs)
    t = ids.shape[1]
    completions = []
    for row, (n, reason) in enumerate(zip(out.lengths, out.finish_reasons, strict=True)):
        gen = out.sequences[row, t:t + n]
        stream = streams[row]
        if on_text is None:
            for token in gen:
                stream.add(token)
        stream.finish()
        rest = stream.release(final=True)
        if on_text is not None and rest:
            on_text(row, rest)
        lp = None if out.logprobs is None else out.logprobs[row, :n].tolist()
        completions.append(Completion(prompts[row // r], stream.text, reason, gen.tolist(), lp))
    return completions
