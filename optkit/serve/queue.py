"""Waiting requests: one FIFO per API key, served in proportion to the keys' weights.

Stride scheduling: each key carries a virtual time that grows by ``1 / weight`` whenever one
of its requests is taken, and the non-empty key with the smallest virtual time goes next
(ties: the key seen first).  A key that was idle restarts at the current virtual time, so it
cannot save up credit.  With weights 3 and 1, a busy server admits three of A's requests for
each of B's.
Without keys every request shares one FIFO.  Not thread-safe: the scheduler holds its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

_NONE = object()  # "no key" (None is the key of requests without one)


class FairQueue:
    def __init__(self, weights: Mapping[str, float] | None = None):
        self.weights = dict(weights or {})
        for k, w in self.weights.items():
            if not w > 0:
                raise ValueError(f"weight of key {k!r} must be positive, got {w}")
        self._queues: dict[str | None, deque] = {}
        self._vtime: dict[str | None, float] = {}
        self._now = 0.0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, item: Any, key: str | None = None) -> None:
        q = self._queues.setdefault(key, deque())
        if not q:
            self._vtime[key] = max(self._vtime.get(key, 0.0), self._now)
        q.append(item)
        self._len += 1

    def _next_key(self):
        best = _NONE
        for k, q in self._queues.items():
            if q and (best is _NONE or self._vtime[k] < self._vtime[best]):
                best = k
        return best

    def peek(self) -> Any | None:
        k = self._next_key()
        return None if k is _NONE else self._queues[k][0]

    def pop(self) -> Any:
        k = self._next_key()
        if k is _NONE:
            raise IndexError("pop from an empty FairQueue")
        self._now = self._vtime[k]
        self._vtime[k] += 1.0 / self.weights.get(k, 1.0)
        self._len -= 1
        return self._queues[k].popleft()

    def remove(self, item: Any) -> bool:
        for q in self._queues.values():
            try:
                q.remove(item)
            except ValueError:
                continue
            self._len -= 1
            return True
        return False

    def items(self) -> list:
        return [x for q in self._queues.values() for x in q]
