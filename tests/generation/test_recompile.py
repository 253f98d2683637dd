"""Repeated generate calls with the same shapes trace and compile nothing new, even when
values that only live in the loop state change (seeds, temperatures, penalties, EOS ids)."""

import contextlib

import jax
import pytest

from optkit.generation import generate
from tests.conftest import CONFIGS, left_padded_batch
from tests.generation.conftest import model_pair

EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def count_compiles():
    seen = []

    def listener(name, secs, **kw):
        if name in EVENTS:
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("first,again", [
    ({}, {}),
    ({"repetition_penalty": 1.2, "no_repeat_ngram_size": 2, "eos_token_id": 5},
     {"repetition_penalty": 1.7, "no_repeat_ngram_size": 2, "eos_token_id": 9,
      "min_new_tokens": 3}),
    ({"do_sample": True, "seed": 1}, {"do_sample": True, "seed": 2, "temperature": 0.5,
                                      "top_k": 7, "top_p": 0.8}),
    ({"num_beams": 4}, {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.3,
                        "early_stopping": True}),
])
def test_second_call_does_not_recompile(first, again):
    _, ex = model_pair("pre_ln")
    ids, mask = left_padded_batch(CONFIGS["pre_ln"], [6, 2, 4], seed=5)
    generate(ex, ids, mask, max_new_tokens=8, **first)
    with count_compiles() as seen:
        generate(ex, ids, mask, max_new_tokens=8, **again)
    assert seen == []


def test_counter_sees_compiles():
    """Control: a new shape does compile, so the counter above can fail."""
    import numpy as np

    from tests.generation.fakes import ScriptedExecutor, script_tokens

    ex = ScriptedExecutor(script_tokens([[5, 6, 7]], 50))
    with count_compiles() as seen:
        generate(ex, np.array([[3, 4]]), max_new_tokens=3, steps_per_dispatch=2)
    assert seen
