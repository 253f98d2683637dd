"""Greedy decoding and beam search give exactly HF transformers' token sequences.

Both sides hold the same random fp32 weights (tests/conftest.py ``hf_model``).  Random
models rarely emit the real EOS, so most cases also make a token the model does emit an EOS
(one or two of them): rows then end at different steps, beam hypotheses finish early and
``early_stopping`` / ``length_penalty`` matter.  Cases are grouped so that few distinct
programs compile (the settings that change shapes or processors are static; penalties,
length penalty, early stopping, EOS ids are not).
"""

from collections import Counter

import numpy as np
import pytest
import torch

from optkit.generation import generate
from tests.conftest import CONFIGS, left_padded_batch
from tests.generation.conftest import hf_generate, model_pair

NEW = 8
BATCHES = {"padded": [6, 2, 4], "single": [5]}


def frequent_tokens(hf, ids, mask, k: int) -> list[int]:
    """The ``k`` tokens greedy decoding emits most often (candidates for a fake EOS)."""
    new = hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=[])[:, ids.shape[1]:]
    return [t for t, _ in Counter(new.ravel().tolist()).most_common(k)]


def check(name: str, batch: str, eos: str, seed: int = 0, **kw):
    """Same sequences as HF (and with ``output_scores``, the same scores and beams)."""
    hf, ex = model_pair(name)
    ids, mask = left_padded_batch(CONFIGS[name], BATCHES[batch], seed=seed)
    if eos == "one":
        kw["eos_token_id"] = frequent_tokens(hf, ids, mask, 1)[0]
    elif eos == "two":
        kw["eos_token_id"] = frequent_tokens(hf, ids, mask, 2)
    msg = f"{name} {batch} eos={eos} seed={seed} {kw}"
    if not kw.get("output_scores"):
        ref = hf_generate(hf, ids, mask, max_new_tokens=NEW, **kw)
        ours = generate(ex, ids, mask, max_new_tokens=NEW, **kw)
        np.testing.assert_array_equal(ours, ref, err_msg=msg)
        return ref, ids.shape[1]
    kw.update(return_dict_in_generate=True, max_new_tokens=NEW)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          do_sample=False, **kw)
    ours = generate(ex, ids, mask, **kw)
    np.testing.assert_array_equal(ours.sequences, ref.sequences.numpy(), err_msg=msg)
    assert len(ours.scores) == len(ref.scores)
    for a, b in zip(ours.scores, ref.scores, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4, err_msg=msg)
    if kw.get("num_beams", 1) > 1:
        np.testing.assert_array_equal(ours.beam_indices, ref.beam_indices.numpy())
        np.testing.assert_allclose(ours.sequences_scores, ref.sequences_scores.numpy(),
                                   rtol=1e-5)
    return ref.sequences.numpy(), ids.shape[1]


GREEDY_CASES = [
    ("pre_ln", {}, "one", 0),
    ("pre_ln", {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}, "one", 0),
    ("pre_ln", {"repetition_penalty": 0.8, "no_repeat_ngram_size": 3}, "default", 2),
    ("pre_ln", {"bad_words_ids": [[7], [11, 12]], "min_new_tokens": 3, "output_scores": True},
     "one", 2),
    ("post_ln_proj", {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
                      "bad_words_ids": [[7], [11, 12]], "min_new_tokens": 3}, "one", 0),
    ("odd_heads", {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
                   "bad_words_ids": [[7], [11, 12]], "min_new_tokens": 3}, "one", 0),
]


def _ids(cases):
    return [f"{c[0]}-{c[2]}-s{c[3]}-" + ",".join(f"{k}={v}" for k, v in c[1].items())
            for c in cases]


@pytest.mark.parametrize("name,kw,eos,seed", GREEDY_CASES, ids=_ids(GREEDY_CASES))
def test_greedy(name, kw, eos, seed):
    check(name, "padded", eos, seed=seed, **kw)


def test_greedy_rows_end_at_different_steps_and_batch_of_one():
    ref, t = check("pre_ln", "padded", "one", seed=1)
    pad = model_pair("pre_ln")[0].generation_config.pad_token_id
    ended = [(row[t:] == pad).any() for row in ref]
    assert any(ended) and not all(ended)  # the fake EOS ended some rows, not all
    check("pre_ln", "single", "default")


#: (generate kwargs, EOS choice, prompt seed) on pre_ln with a padded batch of three.
BEAM_CASES = [
    ({"num_beams": 2}, "default", 0),
    ({"num_beams": 2}, "one", 2),
    ({"num_beams": 4, "num_return_sequences": 4, "length_penalty": 0.5}, "one", 2),
    ({"num_beams": 4, "num_return_sequences": 2, "early_stopping": True}, "one", 0),
    ({"num_beams": 4, "num_return_sequences": 2, "early_stopping": True}, "one", 2),
    ({"num_beams": 4, "early_stopping": "never", "length_penalty": 2.0}, "one", 2),
    ({"num_beams": 4, "num_return_sequences": 3, "length_penalty": -1.0}, "default", 0),
    ({"num_beams": 4, "num_return_sequences": 3, "length_penalty": -1.0}, "one", 1),
    ({"num_beams": 4, "num_return_sequences": 2, "output_scores": True}, "two", 2),
    ({"num_beams": 4, "num_return_sequences": 2, "no_repeat_ngram_size": 2,
      "repetition_penalty": 1.5, "early_stopping": True}, "one", 2),
    ({"num_beams": 4, "repetition_penalty": 0.7, "no_repeat_ngram_size": 2,
      "early_stopping": "never", "length_penalty": 0.0}, "one", 0),
    ({"num_beams": 4, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}, "default", 1),
]


@pytest.mark.parametrize("kw,eos,seed", BEAM_CASES,
                         ids=_ids([("pre_ln", kw, e, s) for kw, e, s in BEAM_CASES]))
def test_beam_search(kw, eos, seed):
    check("pre_ln", "padded", eos, seed=seed, **kw)


@pytest.mark.parametrize("name", ["post_ln_proj", "odd_heads"])
@pytest.mark.parametrize("kw", [
    {"num_beams": 3, "num_return_sequences": 2, "no_repeat_ngram_size": 2,
     "repetition_penalty": 1.3},
    {"num_beams": 3, "early_stopping": True, "length_penalty": 0.5,
     "no_repeat_ngram_size": 2, "repetition_penalty": 1.3}])
def test_beam_search_other_architectures(name, kw):
    check(name, "padded", "one", **kw)


@pytest.mark.parametrize("kw", [{"num_beams": 4},
                                {"num_beams": 4, "num_return_sequences": 2,
                                 "early_stopping": True}])
def test_beam_search_batch_of_one(kw):
    check("pre_ln", "single", "one", **kw)


def test_beam_cases_exercise_early_finishing():
    """With the fake EOS, returned hypotheses end at different lengths (else the finished-set,
    early stopping and length penalty rules would go untested)."""
    kw, eos, seed = BEAM_CASES[2]
    ref, t = check("pre_ln", "padded", eos, seed=seed, **kw)
    ended = (ref[:, t:] == model_pair("pre_ln")[0].generation_config.pad_token_id).any(axis=1)
    assert ended.any() and not ended.all()


def test_last_dispatch_may_run_past_the_cache():
    """5 new tokens in dispatches of 3 steps: the last dispatch computes two steps beyond the
    cache (their writes are dropped, their tokens discarded); the result is unchanged."""
    hf, ex = model_pair("pre_ln")
    ids, mask = left_padded_batch(CONFIGS["pre_ln"], BATCHES["padded"], seed=3)
    np.testing.assert_array_equal(generate(ex, ids, mask, max_new_tokens=5, steps_per_dispatch=3),
                                  hf_generate(hf, ids, mask, max_new_tokens=5))
