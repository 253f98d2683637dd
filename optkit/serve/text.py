"""Token ids <-> text for the server: codecs, log-prob entries and echoed prompts.

Incremental detokenization and stop strings are generation's (:class:`TextStream`,
:class:`HFCodec`, the :class:`Codec` protocol; re-exported here).  This module adds the
fake engine's :class:`CharCodec` (one ASCII character per id), the per-token
:class:`TokenEntry` of a choice's ``logprobs`` and :func:`prompt_entries` for ``echo``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optkit.generation.stream import Codec, HFCodec, TextStream


class CharCodec:
    """One ASCII character per id (id = ``ord``); id 0 is the special end-of-text token.
    Characters outside ASCII encode as ``?``; no special token is ever added.  Used with
    the fake engine."""

    vocab_size = 128
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) if 0 < ord(c) < 128 else ord("?") for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(int(i)) for i in ids if int(i) != 0)

    def token_str(self, token: int) -> str:
        return "<eot>" if int(token) == 0 else chr(int(token))

    def is_special(self, token: int) -> bool:
        return int(token) == 0


@dataclass
class TokenEntry:
    """One token of a choice's ``logprobs``: its text, log-probability (None for the first
    prompt token), top alternatives (text -> log-prob) and where its text starts."""

    token: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


def prompt_entries(codec: Codec, ids: Sequence[int], logprobs: Sequence[float] | None,
                   tops: Sequence[dict[str, float]] | None) -> tuple[str, list[TokenEntry]]:
    """Echo text of a prompt and its token entries (the first token has no log-prob)."""
    stream = TextStream(codec)
    for i, t in enumerate(ids):
        lp = None if i == 0 or logprobs is None else float(logprobs[i - 1])
        top = None if i == 0 or tops is None else tops[i - 1]
        stream.add(t, TokenEntry(codec.token_str(t), lp, top, 0))
    stream.finish()
    return stream.text, stream.pop_entries(final=True)


__all__ = ["CharCodec", "Codec", "HFCodec", "TextStream", "TokenEntry", "prompt_entries"]
