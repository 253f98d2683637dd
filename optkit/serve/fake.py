"""A hand-checkable engine for server tests: no model, deterministic tokens, chosen delays.

Pair it with :class:`optkit.serve.text.CharCodec` (one ASCII character per id).  The next
token is the *successor* of the previous one: ``a``->``b`` ... ``y``->``z``->``a`` (lower
case cycles forever), ``A``->``B`` ... ``Y``->``Z``->end-of-text (id 0), any other character
-> ``a``.  So the prompt ``"abc"`` continues ``"defgh..."`` and ``"XY"`` gives ``"Z"`` and
stops.  Sampling parameters are ignored.  Log-probs are powers of two: the chosen token has
log(1/2), the j-th alternative (successor of the successor ...) log(2^-(j+1)); a prompt
token scores log(1/2) if it is the successor of the token before it, else log(1/128).
"""

from __future__ import annotations

import math
import time

import numpy as np

from optkit.serve.engine import EngineRequest, Prefix, Tokens

EOT = 0


def successor(token: int) -> int:
    c = chr(int(token)) if 0 < int(token) < 128 else ""
    if "a" <= c < "z" or "A" <= c < "Z":
        return ord(c) + 1
    if c == "z":
        return ord("a")
    if c == "Z":
        return EOT
    return ord("a")


def alternatives(token: int, k: int) -> tuple[list[int], list[float]]:
    """The chosen token and its k-1 followers with log(1/2), log(1/4), ..."""
    ids, t = [], int(token)
    for _ in range(k):
        ids.append(t)
        t = successor(t) if t != EOT else ord("a")
    return ids, [math.log(2.0 ** -(j + 1)) for j in range(k)]


class FakeEngine:
    """The engine contract (see :mod:`optkit.serve.engine`) without a model.

    ``prefill_delay`` / ``step_delay`` are seconds slept per prefill / per decode step, so
    tests can hold requests in flight; ``calls`` counts each method's calls.
    """

    vocab_size = 128
    eos_token_id = EOT

    def __init__(self, max_slots: int = 4, max_len: int = 256, max_logprobs: int = 5,
                 prefill_delay: float = 0.0, step_delay: float = 0.0):
        self.max_slots = max_slots
        self.max_len = max_len
        self.max_logprobs = max_logprobs
        self.prefill_delay = prefill_delay
        self.step_delay = step_delay
        self.last = np.zeros(max_slots, np.int64)
        self.live = np.zeros(max_slots, bool)
        self.calls = {"prefill": 0, "insert": 0, "generate": 0, "free": 0}

    def _tokens(self, nexts: list[int], num_top: int) -> Tokens:
        ids = np.array(nexts, np.int64)
        lps = np.full(len(nexts), math.log(0.5))
        if not num_top:
            return Tokens(ids, lps)
        tops = [alternatives(t, self.max_logprobs) for t in nexts]
        return Tokens(ids, lps, np.array([t[0] for t in tops]), np.array([t[1] for t in tops]))

    def prefill(self, request: EngineRequest) -> Prefix:
        self.calls["prefill"] += 1
        n = len(request.prompt)
        if not 1 <= n or n + request.max_tokens > self.max_len:
            raise ValueError(f"prompt of {n} + {request.max_tokens} tokens does not fit "
                             f"{self.max_len} positions")
        time.sleep(self.prefill_delay)
        k = self.max_logprobs if request.num_top else 0
        prefix = Prefix(state=request.prompt[-1], length=n,
                        first=self._tokens([successor(request.prompt[-1])], k),
                        request=request)
        if request.prompt_logprobs:
            p = request.prompt
            prefix.prompt_logprobs = np.array(
                [math.log(0.5) if p[i] == successor(p[i - 1]) else math.log(1 / 128)
                 for i in range(1, n)])
            if k:
                tops = [alternatives(successor(p[i - 1]), k) for i in range(1, n)]
                prefix.prompt_top_ids = np.array([t[0] for t in tops]).reshape(n - 1, k)
                prefix.prompt_top_logprobs = np.array([t[1] for t in tops]).reshape(n - 1, k)
        return prefix

    def insert(self, prefix: Prefix, slot: int) -> None:
        self.calls["insert"] += 1
        self.last[slot] = prefix.first.ids[0]
        self.live[slot] = True

    def generate(self, num_steps: int = 1) -> Tokens:
        self.calls["generate"] += 1
        time.sleep(self.step_delay * num_steps)
        steps = []
        for _ in range(num_steps):
            self.last = np.array([successor(t) for t in self.last], np.int64)
            steps.append(self._tokens(list(self.last), self.max_logprobs))
        return Tokens(np.stack([s.ids for s in steps]), np.stack([s.logprobs for s in steps]),
                      np.stack([s.top_ids for s in steps]),
                      np.stack([s.top_logprobs for s in steps]))

    def free(self, slot: int) -> None:
        self.calls["free"] += 1
        self.live[slot] = False
