"""generate's arguments: HF defaults, and clear errors for unknown or contradictory ones."""

import numpy as np
import pytest

from optkit.generation import check_inputs
from optkit.generation.config import resolve
from tests.conftest import CONFIGS

CFG = CONFIGS["pre_ln"]  # 128 positions, vocab 1000, eos 2, pad 1


def test_hf_defaults():
    gc = resolve(CFG, 5)
    assert gc.max_new_tokens == 20 and gc.eos_token_id == (2,) and gc.pad_token_id == 1
    assert resolve(CFG, 120).max_new_tokens == 8  # the default is capped by the positions
    gc = resolve(CFG, 5, do_sample=True)
    assert (gc.temperature, gc.top_k, gc.top_p) == (1.0, 50, 1.0)
    assert resolve(CFG, 5, max_length=12).max_new_tokens == 7
    assert resolve(CFG, 5, min_new_tokens=3).min_length == 8
    assert resolve(CFG, 5, eos_token_id=[4, 9]).eos_token_id == (4, 9)
    assert resolve(CFG, 5, stop="x").stop == ("x",)
    # a bad word equal to an EOS id is dropped, as in HF
    assert resolve(CFG, 5, bad_words_ids=[[2], [7, 8]]).bad_words_ids == ((7, 8),)


@pytest.mark.parametrize("kw,error,match", [
    ({"max_lenght": 5}, TypeError, "unsupported arguments \\['max_lenght'\\]"),
    ({"max_length": 5}, ValueError, "must exceed its length"),
    ({"max_length": 9, "max_new_tokens": 3}, ValueError, "not both"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 200}, ValueError, "exceed the model's 128 positions"),
    ({"max_new_tokens": 2.5}, TypeError, "must be an integer"),
    ({"min_length": 3, "min_new_tokens": 3}, ValueError, "not both"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"do_sample": True, "top_p": 0.0}, ValueError, "top_p must lie in"),
    ({"do_sample": True, "top_k": -1}, ValueError, "top_k must be >= 0"),
    ({"num_beams": 0}, ValueError, "num_beams must be >= 1"),
    ({"num_return_sequences": 2}, ValueError, "needs do_sample=True or num_beams"),
    ({"num_beams": 2, "num_return_sequences": 3}, ValueError, "must be <= num_beams"),
    ({"num_beams": 2, "early_stopping": "sometimes"}, ValueError, "early_stopping must be"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty must be > 0"),
    ({"no_repeat_ngram_size": -1}, ValueError, ">= 0"),
    ({"eos_token_id": 5000}, ValueError, "outside the vocabulary"),
    ({"bad_words_ids": [[]]}, ValueError, "bad_words_ids must be"),
    ({"bad_words_ids": [[3, 1001]]}, ValueError, "outside the vocabulary"),
    ({"stop": "a", "stop_strings": "b"}, ValueError, "not both"),
    ({"stop": [""]}, ValueError, "non-empty strings"),
    ({"num_beams": 2, "stop": "x"}, ValueError, "need num_beams=1"),
    ({"num_beams": 2, "on_token": print}, ValueError, "need num_beams=1"),
    ({"num_beams": 2, "top_logprobs": 2, "return_dict_in_generate": True}, ValueError,
     "top_logprobs needs num_beams=1"),
    ({"on_token": 3}, TypeError, "on_token must be callable"),
    ({"use_cache": False}, ValueError, "use_cache=False"),
])
def test_bad_arguments_raise_clear_errors(kw, error, match):
    with pytest.raises(error, match=match):
        resolve(CFG, 5, **kw)


@pytest.mark.parametrize("kw,match", [
    ({"temperature": 0.5}, "only apply to sampling"),
    ({"length_penalty": 2.0}, "only apply to beam search"),
    ({"output_scores": True}, "need return_dict_in_generate"),
    ({"min_new_tokens": 200}, "exceeds the maximum length"),
])
def test_ignored_arguments_warn_like_hf(kw, match):
    with pytest.warns(UserWarning, match=match):
        resolve(CFG, 5, **kw)


def test_input_checks():
    ids = np.array([[1, 5, 6], [7, 8, 9]])
    _, mask = check_inputs(ids, [[0, 1, 1], [1, 1, 1]])
    assert mask.dtype == np.int32
    with pytest.raises(ValueError, match="left padding"):
        check_inputs(ids, [[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="does not match"):
        check_inputs(ids, [[1, 1]])
    with pytest.raises(ValueError, match="length > 0"):
        check_inputs(np.zeros((2, 0), int), None)
