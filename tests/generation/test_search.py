"""The decoding loop, checked by hand on a scripted executor: EOS per row, min_new_tokens,
stop strings at the right character, streaming, dispatch grouping, logprobs."""

import numpy as np
import pytest

from optkit import get_tokenizer
from optkit.generation import generate, generate_text
from tests.generation.fakes import ScriptedExecutor, script_tokens

TOK = get_tokenizer()
V = 50272
EOS, PAD = 2, 1


def encode(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def run(rows, runner_up=None, prompt_len=2, **kw):
    ex = ScriptedExecutor(script_tokens(rows, V, runner_up))
    ids = np.full((len(rows), prompt_len), 5)
    return ex, generate(ex, ids, return_dict_in_generate=True, **kw)


def test_eos_ends_one_row_while_others_continue():
    ex, out = run([[5, EOS, 9, 9, 9, 9], [5, 6, 7, 8, 9, 10]], max_new_tokens=6)
    np.testing.assert_array_equal(out.sequences[:, 2:], [[5, EOS, PAD, PAD, PAD, PAD],
                                                         [5, 6, 7, 8, 9, 10]])
    assert out.finish_reasons == ["stop", "length"]
    np.testing.assert_array_equal(out.lengths, [2, 6])
    fed = np.concatenate(ex.fed, axis=0)[:5].T  # tokens fed back to the model
    np.testing.assert_array_equal(fed, [[5, EOS, PAD, PAD, PAD], [5, 6, 7, 8, 9]])


def test_all_rows_ended_stops_early():
    _, out = run([[5, EOS], [EOS]], max_new_tokens=10)
    np.testing.assert_array_equal(out.sequences[:, 2:], [[5, EOS], [EOS, PAD]])


@pytest.mark.parametrize("kw,expect", [
    ({}, [EOS]),
    ({"min_new_tokens": 3}, [50, 50, 50, EOS]),
    ({"min_length": 2 + 2}, [50, 50, EOS]),
])
def test_min_new_tokens_suppresses_eos(kw, expect):
    _, out = run([[EOS] * 8], runner_up=50, max_new_tokens=8, **kw)
    assert out.sequences[0, 2:].tolist() == expect


@pytest.mark.parametrize("stop,n_tokens,text", [
    ("d. T", 4, "Hello worl"),           # spans three tokens, ends inside the fourth
    ("ell", 1, "H"),                     # inside the first token
    ("\n\n", 10, "Hello world. The end is near."),
    (["near", "end is"], 6, "Hello world. The "),  # the first to complete wins
    ("Hello world. The end is near.\n\nNext!", 11, "Hello world. The end is near.\n\nNext"),
])
def test_stop_strings_end_at_the_right_character(stop, n_tokens, text):
    toks = encode("Hello world. The end is near.\n\nNext")
    ex = ScriptedExecutor(script_tokens([toks], V))
    out = generate(ex, np.full((1, 2), 5), max_new_tokens=len(toks), stop=stop,
                   return_dict_in_generate=True, eos_token_id=[])
    assert out.lengths[0] == n_tokens
    assert out.sequences[0, 2:2 + n_tokens].tolist() == toks[:n_tokens]
    done = text != "Hello world. The end is near.\n\nNext"
    assert out.finish_reasons == ["stop" if done else "length"]
    (c,) = generate_text(ex, TOK, "x", stop=stop, max_new_tokens=len(toks), eos_token_id=[])
    assert c.text == text and c.finish_reason == out.finish_reasons[0]
    assert c.tokens == toks[:n_tokens]


def test_stop_string_inside_a_multibyte_character_sequence():
    toks = encode("naïve café")
    ex = ScriptedExecutor(script_tokens([toks], V))
    (c,) = generate_text(ex, TOK, "x", stop="ï", max_new_tokens=len(toks), eos_token_id=[])
    assert c.text == "na" and c.finish_reason == "stop" and len(c.tokens) == 3


def test_stop_per_row_and_hf_spelling():
    rows = [encode("one two three four five six"), encode("alpha beta gamma delta")]
    ex = ScriptedExecutor(script_tokens(rows, V))
    out = generate(ex, np.full((2, 2), 5), max_new_tokens=6, stop_strings=[" three"],
                   tokenizer=TOK, return_dict_in_generate=True, eos_token_id=[])
    assert out.finish_reasons == ["stop", "length"]
    assert TOK.decode(out.sequences[0, 2:2 + out.lengths[0]]) == "one two three"
    assert (out.sequences[0, 2 + out.lengths[0]:] == PAD).all()


def test_on_token_streams_every_step_in_order():
    seen = []
    rows = [[5, 6, EOS], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    _, out = run(rows, max_new_tokens=10, on_token=lambda t: seen.append(t.copy()),
                 steps_per_dispatch=4)
    np.testing.assert_array_equal(np.stack(seen, axis=1), out.sequences[:, 2:])
    assert len(seen) == 10


def test_streamed_text_never_retracts_and_skips_the_stop_string():
    rows = [encode("Hello world. The end is near."), encode("abc abc abc abc abc")]
    ex = ScriptedExecutor(script_tokens(rows, V))
    deltas = {0: [], 1: []}
    comps = generate_text(ex, TOK, ["p", "q"], stop=[" is n", "c ab"],
                          on_text=lambda row, d: deltas[row].append(d), max_new_tokens=8,
                          eos_token_id=[])
    assert [c.text for c in comps] == ["Hello world. The end", "ab"]
    for row, c in enumerate(comps):
        assert "".join(deltas[row]) == c.text


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_output_does_not_depend_on_steps_per_dispatch(steps):
    rows = [[5, 6, 7, EOS], [8, 9, 10, 11, 12, EOS], [13] * 9]
    _, out = run(rows, max_new_tokens=9, steps_per_dispatch=steps)
    np.testing.assert_array_equal(out.sequences[:, 2:], [
        [5, 6, 7, EOS, PAD, PAD, PAD, PAD, PAD],
        [8, 9, 10, 11, 12, EOS, PAD, PAD, PAD], [13] * 9])


def test_logprobs_of_chosen_and_top_tokens():
    ex, out = run([[5, 6, EOS], [7, 8, 9]], max_new_tokens=3, output_logprobs=True,
                  top_logprobs=2)
    lp = out.logprobs
    script = np.asarray(ex.script)
    # row 0 ended after 3 tokens; every chosen token has the script's max logit
    logz = np.log(np.exp(script[0, 0] - script[0, 0].max()).sum()) + script[0, 0].max()
    np.testing.assert_allclose(lp[0, 0], script[0, 0, 5] - logz, rtol=1e-5)
    ids, top = out.top_logprobs
    assert ids.shape == (2, 3, 2) and (ids[:, :, 0] == out.sequences[:, 2:]).all()
    np.testing.assert_allclose(top[:, :, 0], lp, rtol=1e-6)


def test_mesh_executor_matches_single_device():
    """Beam search on a tensor-parallel executor (4 fake devices; the cache, reordered by
    ``select`` every step, is sharded over heads) gives the single-device sequences."""
    import jax
    from jax.sharding import Mesh

    from optkit.parallel import TENSOR_RULES
    from optkit.parallel.executor import MeshExecutor
    from optkit.weights.load import load_params
    from optkit.weights.random import random_state_dict
    from tests.conftest import CONFIGS, left_padded_batch
    from tests.generation.conftest import model_pair

    cfg = CONFIGS["pre_ln"]
    _, single = model_pair("pre_ln")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "tensor"))
    probe = MeshExecutor(cfg, {"layers": []}, mesh, TENSOR_RULES, dtype=np.float32)
    params = load_params(dict(random_state_dict(cfg, 0)), cfg, progress=False,
                         sharding_for=probe.param_sharding)
    sharded = MeshExecutor(cfg, params, mesh, TENSOR_RULES)
    ids, mask = left_padded_batch(cfg, [6, 2, 4], seed=2)
    kw = {"max_new_tokens": 8, "num_beams": 4, "num_return_sequences": 2}
    np.testing.assert_array_equal(generate(sharded, ids, mask, **kw),
                                  generate(single, ids, mask, **kw))


def test_decode_loop_ends_on_the_device_once_every_row_is_done():
    """A dict state whose ``done`` rows are all true runs no step: the cache does not move;
    with one row still open every step runs."""
    from tests.generation.conftest import model_pair

    _, ex = model_pair("pre_ln")

    def step(logits, st):
        tok = logits.argmax(-1).astype(np.int32)
        return tok, st, {"tokens": tok}

    for done, moved in (([True, True], 0), ([True, False], 5)):
        cache = ex.init_cache(2, 16)
        _, cache = ex.prefill(np.array([[3, 4], [5, 6]]), np.ones((2, 2), np.int32), cache)
        _, cache, _, outs = ex.decode_loop(step, np.array([7, 8]), cache,
                                           {"done": np.array(done)}, 5, max_steps=8)
        assert np.asarray(cache["index"]).tolist() == [2 + moved] * 2
        assert np.asarray(outs["tokens"]).shape == (5, 2)


def test_generate_without_streaming_is_one_dispatch_on_a_fused_kernel():
    """Where attention reads only written positions (dispatch_span: all remaining steps),
    greedy generate runs its whole decode in one dispatch; streaming uses chunks."""
    ex = ScriptedExecutor(script_tokens([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], 16))
    out = generate(ex, np.array([[3, 4]]), max_new_tokens=10, eos_token_id=[],
                   return_dict_in_generate=True)
    assert out.timings["dispatches"] == 1
    assert out.sequences[0, 2:].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    seen = []
    out = generate(ex, np.array([[3, 4]]), max_new_tokens=10, eos_token_id=[],
                   return_dict_in_generate=True, on_token=seen.append)
    assert out.timings["dispatches"] == 2 and len(seen) == 10
