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
from collections.abc import Sequence

import numpy as np

from optkit.serve.engine import StepOutput, Tokens, Work

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


def choose(last: int, seen: set[int], generated: int, work: Work,
           k: int) -> tuple[int, float, list[int], list[float]]:
    """The next token after ``last`` -> (token, its log-prob, top k ids, their log-probs)."""
    ids, lps = alternatives(successor(last), max(k, 4))
    sp = work.request.sampling
    scores = [lp * sp.repetition_penalty if t in seen else lp
              for t, lp in zip(ids, lps, strict=True)]
    if generated < sp.min_tokens:
        scores = [-math.inf if t == EOT else s for t, s in zip(ids, scores, strict=True)]
    i = int(np.argmax(scores))
    return ids[i], lps[i], ids[:k], lps[:k]


class FakeEngine:
    """The engine contract (see :mod:`optkit.serve.engine`) without a model.

    ``max_slots`` sequences in flight, blocks of 16 tokens (enough for each of them to hold
    ``max_len`` tokens), prompts chunked by ``max_batched_tokens``.  ``prefill_delay`` /
    ``step_delay`` are seconds slept per prompt started / per decode step (of steps with
    decodes), so tests can hold requests in flight; ``calls`` counts ``prefill`` (works
    starting a prompt), ``generate`` (decode-only dispatches) and ``step`` (every call);
    ``works`` is the last step's works.
    """

    vocab_size = 128
    eos_token_id = EOT
    block_size = 16
    chunked_prefill = True
    chunk_granule = 1
    decodes_in_budget = True
    prefix_caching = True
    penalties = True

    def __init__(self, max_slots: int = 4, max_len: int = 256, max_logprobs: int = 5,
                 prefill_delay: float = 0.0, step_delay: float = 0.0,
                 max_batched_tokens: int = 64, num_blocks: int | None = None):
        self.max_slots = self.max_num_seqs = max_slots
        self.max_len = max_len
        self.max_logprobs = max_logprobs
        self.max_batched_tokens = max_batched_tokens
        self.num_blocks = num_blocks or max_slots * -(-max_len // self.block_size) + 1
        self.prefill_delay = prefill_delay
        self.step_delay = step_delay
        self.calls = {"prefill": 0, "generate": 0, "step": 0}
        self.works: list[Work] = []

    def step(self, works: Sequence[Work], num_steps: int = 1) -> StepOutput:
        self.calls["step"] += 1
        self.works = list(works)
        starting = sum(w.start == 0 for w in works)
        self.calls["prefill"] += starting
        if all(len(w.tokens) == 1 and w.start > 0 for w in works):
            self.calls["generate"] += 1
        decodes = any(w.start > 0 and len(w.tokens) == 1 for w in works)
        time.sleep(self.prefill_delay * starting + self.step_delay * num_steps * decodes)
        k = self.max_logprobs
        rows = []
        for w in works:
            last, seen, picks = int(w.tokens[-1]), set(w.context) | set(w.tokens), []
            for j in range(num_steps):
                pick = choose(last, seen, w.count + j, w, k)
                last = pick[0]
                seen.add(last)
                picks.append(pick)
            rows.append(picks)
        toks = Tokens(np.array([[r[j][0] for r in rows] for j in range(num_steps)], np.int64),
                      np.array([[r[j][1] for r in rows] for j in range(num_steps)]),
                      np.array([[r[j][2] for r in rows] for j in range(num_steps)],
                               np.int64).reshape(num_steps, len(works), k),
                      np.array([[r[j][3] for r in rows] for j in range(num_steps)],
                               float).reshape(num_steps, len(works), k))
        scores = []
        for w in works:
            if not w.targets:
                scores.append(None)
                continue
            pairs = list(zip(w.tokens, w.targets, strict=False))
            lp = np.array([math.log(0.5) if t == successor(p) else math.log(1 / 128)
                           for p, t in pairs])
            tops = [alternatives(successor(p), k) for p, _ in pairs]
            scores.append((lp, np.array([t[0] for t in tops]).reshape(len(pairs), k),
                           np.array([t[1] for t in tops]).reshape(len(pairs), k)))
        return StepOutput(toks, scores)
