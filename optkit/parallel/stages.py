"""One pipeline stage's computation, built from the model's stage pieces.

A stage runs its layers and, when it is the first, the embedding, and when it is the last,
the final norm and LM head.  With ``first=last=True`` a stage is the whole model
(``model.prefill`` / ``model.decode_step``).  The executors and the planner's abstract
compiles call these same functions, so what is planned is what runs.
"""

from __future__ import annotations

import jax

from optkit import model as M
from optkit.config import OPTConfig
from optkit.parallel.plan import FIRST_STAGE, LAST_STAGE


def stage_prefill(params, cfg: OPTConfig, inputs: jax.Array, attention_mask: jax.Array,
                  cache, *, first: bool, last: bool, all_logits: bool = False, lookup=None):
    """tokens (B,T) [first] or hidden (B,T,H) -> hidden (B,T,H) or logits [last], cache
    (``lookup``: see ``model.embed``)."""
    x = inputs
    if first:
        x = M.embed(params, cfg, inputs, M.positions_from_mask(attention_mask), lookup)
    x, cache = M.prefill_layers(params["layers"], cfg, x, attention_mask, cache)
    if last:
        x = M.unembed(params, cfg, x if all_logits else x[:, -1])
    return x, cache


def stage_decode(params, cfg: OPTConfig, inputs: jax.Array, cache, *, first: bool,
                 last: bool, live: int | None = None, attention=None, matvec=None,
                 lookup=None):
    """tokens (B,) [first] or hidden (B,1,H) -> hidden (B,1,H) or logits (B,V) [last], cache.
    ``live`` (static) bounds every row's position: attention reads only that much cache;
    ``attention``, ``matvec``: see ``model.decode_layers``; ``lookup``:
    ``model.embed``."""
    x = inputs
    if first:
        x = M.embed(params, cfg, inputs[:, None], M.decode_positions(cache), lookup)
    x, cache = M.decode_layers(params["layers"], cfg, x, cache, live, attention, matvec)
    if last:
        x = M.unembed(params, cfg, x[:, 0])
    return x, cache


def split_params(params: dict, ranges: list[range]) -> list[dict]:
    """Cut a full params tree (unrolled layers) into one tree per stage."""
    out = []
    for s, layers in enumerate(ranges):
        keys = (FIRST_STAGE if s == 0 else ()) + (LAST_STAGE if s == len(ranges) - 1 else ())
        tree = {k: params[k] for k in dict.fromkeys(keys) if k in params}
        tree["layers"] = list(params["layers"][layers.start:layers.stop])
        out.append(tree)
    return out
