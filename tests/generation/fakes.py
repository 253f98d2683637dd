"""A scripted executor: row ``r``'s logits at generation step ``i`` are ``script[r, i]``
whatever tokens it is fed, so decoding loops can be checked by hand without a model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from optkit.config import OPTConfig


class ScriptedExecutor:
    """Implements the executor interface generation uses (cache opaque to the caller)."""

    def __init__(self, script: np.ndarray, max_positions: int = 512):
        self.script = jnp.asarray(script, jnp.float32)  # (rows, steps, V)
        rows, self.steps, v = script.shape
        self.cfg = OPTConfig(vocab_size=v, hidden_size=8, num_hidden_layers=1,
                             num_attention_heads=1, ffn_dim=8,
                             max_position_embeddings=max_positions, name="scripted")
        self._fns: dict = {}
        self.fed: list[np.ndarray] = []  # tokens fed to decode, per dispatch (num_steps, B)
        self.lives: list = []  # the live bound passed with each dispatch

    def _logits(self, cache):
        step = jnp.minimum(cache["step"], self.steps - 1)
        return self.script[cache["row"] % self.script.shape[0], step]

    def init_cache(self, batch: int, max_len: int):
        return {"mask": jnp.zeros((batch, max_len), bool), "step": jnp.zeros(batch, jnp.int32),
                "row": jnp.arange(batch, dtype=jnp.int32)}

    def prefill(self, tokens, attention_mask, cache, all_logits=False):
        t = np.asarray(tokens).shape[1]
        cache = {**cache, "mask": cache["mask"].at[:, :t].set(np.asarray(attention_mask) != 0)}
        return self._logits(cache), cache

    def decode_loop(self, step_fn, tokens, cache, state, num_steps: int, live=None,
                    max_steps=None):
        assert max_steps is None or num_steps <= max_steps
        self.lives.append(live)
        key = ("loop", step_fn, num_steps)
        if key not in self._fns:
            def run(tokens, cache, state):
                def body(carry, _):
                    tok, c, st = carry
                    c = {**c, "step": c["step"] + 1}
                    tok_next, st, out = step_fn(self._logits(c), st)
                    return (tok_next, c, st), (out, tok)
                (tok, c, st), (outs, fed) = jax.lax.scan(body, (tokens, cache, state), None,
                                                         length=num_steps)
                return tok, c, st, outs, fed
            self._fns[key] = jax.jit(run)
        tok, cache, state, outs, fed = self._fns[key](jnp.asarray(tokens), cache, state)
        self.fed.append(np.asarray(fed))
        return tok, cache, state, outs

    def dispatch_span(self, position, remaining, batch, max_len):
        return remaining

    def select(self, cache, rows):
        rows = jnp.asarray(rows)
        return jax.tree.map(lambda x: x[rows], cache)


def script_tokens(rows: list[list[int]], vocab: int, runner_up: int | None = None) -> np.ndarray:
    """Logits making row r pick ``rows[r][i]`` at step i greedily (10 above the rest;
    ``runner_up`` 5 above the rest)."""
    steps = max(len(r) for r in rows)
    script = np.zeros((len(rows), steps, vocab), np.float32)
    for r, toks in enumerate(rows):
        for i in range(steps):
            if runner_up is not None:
                script[r, i, runner_up] = 5.0
            script[r, i, toks[min(i, len(toks) - 1)]] = 10.0
    return script
