"""A hand-checkable engine for server tests: no model, deterministic tokens, chosen delays.

Pair it with :class:`optkit.serve.text.CharCodec` (one ASCII character per id).  The fake
model's distribution after a token puts 1/2 on its *successor*, 1/4 on the successor's
successor, and so on: ``a``->``b`` ... ``y``->``z``->``a`` (lower case cycles forever),
``A``->``B`` ... ``Y``->``Z``->end-of-text (id 0)->``a``, any other character -> ``a``.
Decoding is greedy, so the prompt ``"abc"`` continues ``"defgh..."`` and ``"XY"`` gives
``"Z"`` and stops.  Temperature, top-k and top-p are ignored; two sampling parameters are
honoured so the HTTP tests can show them:

* ``min_tokens``: end-of-text is not chosen before that many tokens (``"XY"`` with
  ``min_tokens=3`` gives ``"Zab..."``);
* ``repetition_penalty`` ``p``: a candidate already in the prompt or the output has its
  log-probability multiplied by ``p`` before the choice (``"abcab"`` with ``p=3``: ``c``
  scores 3 log(1/2) < log(1/4), so ``d`` comes next; ties go to the likelier candidate).

Reported log-probs are the unmodified distribution's: the chosen token's, and the top
alternatives successor, successor of successor ... with log(1/2), log(1/4), ...; a prompt
token scores log(1/2) if it is the successor of the token before it, else log(1/128).
"""

from __future__ import annotations

import math
import time

import numpy as np

from optkit.serve.engine import EngineRequest, Prefix, SamplingParams, Tokens

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
    """``token`` and its k-1 followers with log(1/2), log(1/4), ..."""
    ids, t = [], int(token)
    for _ in range(k):
        ids.append(t)
        t = successor(t)
    return ids, [math.log(2.0 ** -(j + 1)) for j in range(k)]


class _Row:
    """One sequence's state: its last token, the tokens seen and its sampling parameters."""

    def __init__(self, prompt: tuple[int, ...], sampling: SamplingParams):
        self.last = int(prompt[-1])
        self.seen = set(prompt)
        self.generated = 0
        self.sampling = sampling

    def next(self, k: int) -> tuple[int, float, list[int], list[float]]:
        """Choose the next token -> (token, its log-prob, top k ids, their log-probs)."""
        ids, lps = alternatives(successor(self.last), max(k, 4))
        sp = self.sampling
        scores = [lp * sp.repetition_penalty if t in self.seen else lp
                  for t, lp in zip(ids, lps, strict=True)]
        if self.generated < sp.min_tokens:
            scores = [-math.inf if t == EOT else s for t, s in zip(ids, scores, strict=True)]
        i = int(np.argmax(scores))
        self.last = ids[i]
        self.seen.add(ids[i])
        self.generated += 1
        return ids[i], lps[i], ids[:k], lps[:k]


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
        self.rows: list[_Row | None] = [None] * max_slots
        self.calls = {"prefill": 0, "insert": 0, "generate": 0, "free": 0}

    def _tokens(self, picks: list[tuple], k: int, with_top: bool = True) -> Tokens:
        ids = np.array([p[0] for p in picks], np.int64)
        lps = np.array([p[1] for p in picks])
        if not with_top:
            return Tokens(ids, lps)
        return Tokens(ids, lps, np.array([p[2] for p in picks], np.int64).reshape(len(picks), k),
                      np.array([p[3] for p in picks], float).reshape(len(picks), k))

    def prefill(self, request: EngineRequest) -> Prefix:
        self.calls["prefill"] += 1
        n = len(request.prompt)
        if not 1 <= n or n + request.max_tokens > self.max_len:
            raise ValueError(f"prompt of {n} + {request.max_tokens} tokens does not fit "
                             f"{self.max_len} positions")
        time.sleep(self.prefill_delay)
        k = self.max_logprobs if request.num_top else 0
        row = _Row(request.prompt, request.sampling)
        prefix = Prefix(state=row, length=n, first=self._tokens([row.next(k)], k, bool(k)),
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
        self.rows[slot] = prefix.state

    def generate(self, num_steps: int = 1) -> Tokens:
        self.calls["generate"] += 1
        time.sleep(self.step_delay * num_steps)
        k, idle = self.max_logprobs, (EOT, 0.0, [EOT] * self.max_logprobs,
                                      [0.0] * self.max_logprobs)
        steps = [self._tokens([r.next(k) if r is not None else idle for r in self.rows], k)
                 for _ in range(num_steps)]
        return Tokens(np.stack([s.ids for s in steps]), np.stack([s.logprobs for s in steps]),
                      np.stack([s.top_ids for s in steps]),
                      np.stack([s.top_logprobs for s in steps]))

    def free(self, slot: int) -> None:
        self.calls["free"] += 1
        self.rows[slot] = None
