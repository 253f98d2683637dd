"""Stop strings: matched on decoded text, so they may start or end inside a token.

Decoding runs on the device; the host checks each new token of each live row here.  A row
stops at the token whose text completes the first occurrence of any stop string in its
continuation (the prompt is not searched); the returned text ends just before that
occurrence (:func:`cut_at_stop`).
"""

from __future__ import annotations

from collections.abc import Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class StopStrings:
    """Incremental stop-string detection for ``rows`` continuations."""

    def __init__(self, tokenizer, stops: Sequence[str], rows: int):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        # Enough tokens to hold the longest stop string even at one UTF-8 byte per token,
        # plus the token that completes it.
        self.window = 4 * max(len(s) for s in self.stops) + 4
        self.tokens: list[list[int]] = [[] for _ in range(rows)]

    def push(self, row: int, token: int) -> bool:
        """Add ``token`` to ``row``; True when a stop string now occurs in its text."""
        toks = self.tokens[row]
        toks.append(int(token))
        tail = self.tokenizer.decode(toks[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stops)
