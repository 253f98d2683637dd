"""Sampling: the right distribution (chi-square goodness of fit over many draws), HF's
filtering semantics, top_k=1 is greedy, seeds reproduce, beam sampling is consistent."""

import jax
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from optkit.generation import generate
from optkit.generation.sampling import filter_logits, sample, sample_without_replacement
from tests.conftest import CONFIGS, left_padded_batch
from tests.generation.conftest import model_pair
from tests.generation.fakes import ScriptedExecutor

LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5, -2.5], np.float32)
SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.7), (2.0, 3, 0.5)]


def expected_probs(logits, temperature, top_k, top_p):
    """softmax(logits / T) restricted to top-k, then to the smallest top set with mass
    >= top_p (computed independently of the code under test, in float64)."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    keep = np.zeros(len(x), bool)
    keep[order[:top_k or len(x)]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    above = 0.0
    for i in order:
        if above >= top_p:
            keep[i] = False
        above += p[i]
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def hf_kept(logits, temperature, top_k, top_p):
    """Which tokens HF transformers' warpers keep."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    x = torch.tensor(logits)[None]
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return np.isfinite(x[0].numpy())


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sample_frequencies_fit_filtered_softmax(temperature, top_k, top_p):
    n = 20000
    p = expected_probs(LOGITS, temperature, top_k, top_p)
    np.testing.assert_array_equal(p > 0, hf_kept(LOGITS, temperature, top_k, top_p))
    keys = jax.random.split(jax.random.key(7), n)
    draws = np.asarray(sample(np.tile(LOGITS, (n, 1)), keys, np.full(n, temperature, np.float32),
                              np.full(n, top_k, np.int32), np.full(n, top_p, np.float32)))
    counts = np.bincount(draws, minlength=len(LOGITS))
    assert counts[p == 0].sum() == 0  # filtered tokens are never drawn
    kept = p > 0
    assert chisquare(counts[kept], p[kept] * n).pvalue > 1e-3


def test_filter_keeps_min_keep_tokens():
    x = np.tile(LOGITS, (1, 1))
    out = np.asarray(filter_logits(x, np.ones(1, np.float32), np.ones(1, np.int32),
                                   np.full(1, 0.01, np.float32), min_keep=3))
    assert np.isfinite(out).sum() == 3


def test_sample_without_replacement_follows_sequential_draws():
    """First draw ~ softmax; all draws distinct (Gumbel top-k == multinomial w/o replacement)."""
    n = 20000
    keys = jax.random.split(jax.random.key(3), n)
    idx = np.asarray(sample_without_replacement(np.tile(LOGITS, (n, 1)), keys, 4))
    assert all(len(set(r)) == 4 for r in idx[:500])
    p = expected_probs(LOGITS, 1.0, 0, 1.0)
    assert chisquare(np.bincount(idx[:, 0], minlength=len(p)), p * n).pvalue > 1e-3


def test_generate_loop_draws_fit_the_distribution():
    """Through generate's decoding loop: 100 rows x 60 steps from fixed logits."""
    rows, steps = 100, 60
    script = np.tile(LOGITS, (rows, steps + 1, 1))
    ex = ScriptedExecutor(script)
    ids = np.full((rows, 2), 5)
    out = generate(ex, ids, max_new_tokens=steps, do_sample=True, temperature=0.8, top_k=8,
                   top_p=0.9, eos_token_id=[], seed=11)
    new = out[:, 2:]
    p = expected_probs(LOGITS, 0.8, 8, 0.9)
    counts = np.bincount(new.ravel(), minlength=len(p))
    assert counts[p == 0].sum() == 0
    assert chisquare(counts[p > 0], p[p > 0] * new.size).pvalue > 1e-3
    # consecutive draws of a row are independent: pairs (x_t, x_t+1) fit p x p
    pairs = new[:, :-1] * len(p) + new[:, 1:]
    pp = np.outer(p, p).ravel()
    observed = np.bincount(pairs.ravel(), minlength=len(pp))
    common = pp * pairs.size >= 5
    assert observed[pp == 0].sum() == 0
    stat = chisquare(observed[common], pp[common] / pp[common].sum() * observed[common].sum())
    assert stat.pvalue > 1e-3


def test_top_k_1_is_greedy_and_seeds_reproduce():
    _, ex = model_pair("pre_ln")
    ids, mask = left_padded_batch(CONFIGS["pre_ln"], [6, 2, 4], seed=3)
    greedy = generate(ex, ids, mask, max_new_tokens=8)
    kw = {"max_new_tokens": 8, "do_sample": True, "eos_token_id": []}
    np.testing.assert_array_equal(generate(ex, ids, mask, top_k=1, seed=1, **kw)[:, :14],
                                  generate(ex, ids, mask, max_new_tokens=8, eos_token_id=[]))
    assert greedy.shape[1] <= 14
    a = generate(ex, ids, mask, seed=5, temperature=2.0, **kw)
    b = generate(ex, ids, mask, seed=5, temperature=2.0, **kw)
    c = generate(ex, ids, mask, seed=6, temperature=2.0, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_draws_do_not_depend_on_steps_per_dispatch():
    ex = ScriptedExecutor(np.tile(LOGITS, (3, 12, 1)))
    kw = {"max_new_tokens": 11, "do_sample": True, "seed": 4, "eos_token_id": 3}
    outs = [generate(ex, np.full((3, 2), 5), steps_per_dispatch=n, **kw) for n in (1, 4, 8, None)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_num_return_sequences_sampling():
    script = np.tile(LOGITS, (2, 9, 1))
    ex = ScriptedExecutor(script)
    ids = np.array([[5, 6, 7], [1, 8, 9]])
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    out = generate(ex, ids, mask, max_new_tokens=8, do_sample=True, num_return_sequences=3,
                   seed=0, eos_token_id=[])
    assert out.shape == (6, 11)
    np.testing.assert_array_equal(out[:3, :3], np.tile(ids[0], (3, 1)))
    np.testing.assert_array_equal(out[3:, :3], np.tile(ids[1], (3, 1)))
    assert len({tuple(r) for r in out[:, 3:].tolist()}) == 6


def test_beam_sampling_is_seeded_and_valid():
    rng = np.random.default_rng(0)
    script = rng.normal(size=(3, 9, 40)).astype(np.float32)
    kw = {"max_new_tokens": 8, "do_sample": True, "num_beams": 3, "num_return_sequences": 2,
          "top_k": 10, "eos_token_id": 4, "return_dict_in_generate": True,
          "output_scores": True}
    ids = np.array([[5, 6], [7, 8], [9, 10]])
    ex = ScriptedExecutor(script)
    a = generate(ex, ids, seed=1, **kw)
    b = generate(ex, ids, seed=1, **kw)
    others = [generate(ex, ids, seed=s, **kw).sequences for s in range(2, 6)]
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert any(o.shape != a.sequences.shape or (o != a.sequences).any() for o in others)
    assert a.sequences.shape[0] == 6
    assert np.all(np.diff(a.sequences_scores.reshape(3, 2), axis=1) <= 0)  # best first
    # every token drawn was allowed by top-k of its step's processed scores
    for step in a.scores:
        assert (np.isfinite(step).sum(axis=1) <= 10).all()
