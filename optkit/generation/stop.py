"""Stop strings, matched on decoded text (so they may start or end inside a token).

:class:`StopMatcher` is the one matcher: the incremental
:class:`~optkit.generation.stream.TextStream` (under ``generate``'s host loop,
``generate_text`` and the server) asks it where the first stop string begins in text that
grew, and how much of the text's end could still turn into one (held back while streaming).
A continuation ends just before the earliest occurrence of any stop string; the prompt is not
searched.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """A set of non-empty stop strings (empty ones are dropped)."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = tuple(dict.fromkeys(s for s in stops if s))

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, start: int = 0) -> int | None:
        """Where the earliest stop string in ``text`` begins, or None.  ``text[:start]`` is
        known to hold none, so only occurrences ending after ``start`` are looked for."""
        cut = None
        for s in self.stops:
            i = text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (cut is None or i < cut):
                cut = i
        return cut

    def held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
