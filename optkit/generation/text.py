"""Strings in, strings out: tokenize, generate, decode, cut at stop strings, stream text.

``generate_text(model, tokenizer, prompts, stop=..., on_text=..., **generate_kwargs)`` is
what notebooks and the server call.  ``on_text(row, delta)`` receives each row's text as it
grows; a delta is never retracted, so text that could still turn into a stop string (or an
incomplete UTF-8 character) is held back until it is safe, and a stop string is never
streamed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from optkit.generation.stop import cut_at_stop


@dataclasses.dataclass
class Completion:
    """One generated continuation."""

    prompt: str
    text: str  # the continuation, without the stop string and what follows it
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: list[int]  # generated ids, the EOS / stop-string token included
    logprobs: list[float] | None = None  # per token, when output_logprobs=True


class TextStream:
    """One row's tokens -> text deltas that are final."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.tokens: list[int] = []
        self.sent = 0
        self.closed = False

    def _text(self) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return cut_at_stop(text, self.stops)

    def push(self, token: int) -> str:
        if self.closed:
            return ""
        self.tokens.append(int(token))
        text, hit = self._text()
        if hit:
            self.closed = True
            return self._emit(text, len(text))
        safe = len(text.rstrip("\ufffd"))
        held = max((i for s in self.stops for i in range(1, len(s))
                    if text[:safe].endswith(s[:i])), default=0)
        return self._emit(text, safe - held)

    def finish(self) -> str:
        """Whatever was held back, once the row has ended."""
        text, _ = self._text()
        self.closed = True
        return self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> str:
        delta = text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta


def generate_text(model, tokenizer=None, prompts: str | Sequence[str] = (), *,
                  stop: str | Sequence[str] | None = None,
                  on_text: Callable[[int, str], None] | None = None,
                  **kwargs) -> list[Completion]:
    """Complete ``prompts`` (one string or a list) with a JAX model or an executor.

    ``tokenizer`` defaults to optkit's embedded OPT tokenizer.  Other keyword arguments are
    :func:`optkit.generation.generate`'s.  Returns one :class:`Completion` per prompt (times
    ``num_return_sequences``, row ``i * r + j`` continuing prompt ``i``).
    """
    from optkit.generation import generate
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
    streams = [TextStream(tok, stops) for _ in range(len(prompts) * r)] if on_text else None

    def on_token(tokens: np.ndarray) -> None:
        for row, t in enumerate(tokens):
            delta = streams[row].push(t)
            if delta:
                on_text(row, delta)

    out = generate(executor, ids, mask, stop=stops or None, tokenizer=tok,
                   return_dict_in_generate=True, on_token=on_token if on_text else None,
                   **kwargs)
    t = ids.shape[1]
    completions = []
    for row, (n, reason) in enumerate(zip(out.lengths, out.finish_reasons, strict=True)):
        gen = out.sequences[row, t:t + n]
        text, _ = cut_at_stop(tok.decode(gen, skip_special_tokens=True), stops)
        if streams is not None:
            rest = streams[row].finish()
            if rest:
                on_text(row, rest)
        lp = None if out.logprobs is None else out.logprobs[row, :n].tolist()
        completions.append(Completion(prompts[row // r], text, reason, gen.tolist(), lp))
    return completions
