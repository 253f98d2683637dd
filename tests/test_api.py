"""``get_model``: backends, weight resolution, array kinds and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from optkit import get_model
from optkit.config import OPTConfig
from optkit.weights.folder import WeightError
from optkit.weights.random import write_random_folder
from tests.conftest import CONFIGS, left_padded_batch


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    write_random_folder(root / "opt-custom-np", CONFIGS["pre_ln"], seed=2, dtype=np.float32,
                        progress=False)
    return root


def test_seed_style_path_and_folder_config_precedence(weights):
    m = get_model("jax/opt-custom", path=weights, progress=False)
    assert m.config.hidden_size == CONFIGS["pre_ln"].hidden_size
    # the folder's config.json wins over the preset named in model_name
    m2 = get_model("jax/opt-125m", path=weights / "opt-custom-np", progress=False)
    assert m2.config.ffn_dim == CONFIGS["pre_ln"].ffn_dim


@pytest.mark.parametrize("kind", ["numpy", "jax", "torch"])
def test_returns_the_kind_it_was_given(weights, kind):
    m = get_model("jax/opt-custom", path=weights, progress=False)
    ids = np.array([[2, 10, 11, 12]])
    x = {"numpy": ids, "jax": jnp.asarray(ids), "torch": torch.tensor(ids)}[kind]
    logits = m(x).logits
    seq = m.generate(input_ids=x, max_new_tokens=3)
    kinds = {"numpy": np.ndarray, "jax": jax.Array, "torch": torch.Tensor}
    assert isinstance(logits, kinds[kind]) and isinstance(seq, kinds[kind])
    assert tuple(logits.shape) == (1, 4, CONFIGS["pre_ln"].vocab_size)
    assert tuple(seq.shape) == (1, 7)
    if kind == "torch":
        assert seq.dtype == torch.int64


def test_jax_and_facebook_backends_agree_on_the_same_folder(weights):
    cfg = CONFIGS["pre_ln"]
    jm = get_model("jax/opt-custom", path=weights, progress=False)
    hm = get_model("facebook/opt-custom", path=weights)
    ids, mask = left_padded_batch(cfg, [5, 3])
    a = jm(ids, attention_mask=mask).logits
    b = hm(ids, attention_mask=mask).logits
    assert np.abs(a - b)[mask == 1].max() <= 1e-4
    ga = jm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    gb = hm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(ga, gb)


def test_greedy_generation_equals_hf(cfg, hf_dir):
    src, hf = hf_dir(cfg)
    m = get_model("jax/x", path=src, progress=False)  # an HF directory loads directly
    ids, mask = left_padded_batch(cfg, [6, 2, 4], seed=4)
    ours = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=10, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_dummy_any_preset_and_custom_config():
    m = get_model("jax/opt-tiny", dummy=True)
    assert m.config.vocab_size == 50272
    c = OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  ffn_dim=32)
    m = get_model("jax/custom", dummy=True, config=c, dtype="bfloat16")
    assert m.dtype == jnp.bfloat16
    assert m(np.array([[2, 3]])).logits.shape == (1, 2, 100)


def test_alpa_backend_runs(weights):
    m = get_model("alpa/opt-custom", path=weights, progress=False)
    j = get_model("jax/opt-custom", path=weights, progress=False)
    ids = np.array([[2, 5, 6, 7, 8]])
    np.testing.assert_allclose(m(ids).logits, j(ids).logits, atol=1e-4)


@pytest.mark.parametrize("name,kw,err,match", [
    ("jax/opt-125m", {"path": "/nonexistent"}, WeightError, "opt-125m-np"),
    ("tpu/opt-125m", {"dummy": True}, ValueError, "backend"),
    ("jax/opt-9b", {"dummy": True}, ValueError, "unknown OPT model"),
    ("jax/opt-125m", {"dummy": True, "dtype": "int4"}, ValueError, "dtype"),
    ("jax/opt-125m", {"dummy": True, "colour": 1}, TypeError, "colour"),
    ("jax/opt-125m", {"dummy": True, "kernels": "flash"}, ValueError, "choose one of"),
    ("facebook/opt-125m", {"dummy": True, "kernels": "pallas"}, ValueError, "jax/ or alpa/"),
    ("jax/opt-tiny", {"dummy": True, "kernels": "matvec"}, ValueError, "not int8"),
    ("jax/opt-tiny", {"dummy": True, "kernels": "attention,matvec"}, ValueError, "not int8"),
    ("jax/opt-tiny", {"dummy": True, "kernels": "norm"}, ValueError, "choose one of"),
    ("jax/opt-tiny", {"dummy": True, "kernels": 3}, TypeError, "kernels must be a string"),
    ("jax/opt-tiny", {"dummy": True, "quantize": "int4"}, ValueError, "None or 'int8'"),
    ("jax/opt-tiny", {"dummy": True, "dtype": "fp8"}, ValueError, "bfloat16"),
    ("facebook/opt-125m", {"dummy": True, "kernels": "xla"}, ValueError, "jax/ or alpa/"),
    ("alpa/opt-tiny", {"dummy": True, "kernels": "matvec", "cluster": "auto"}, ValueError,
     "not int8"),
])
def test_bad_arguments(name, kw, err, match):
    with pytest.raises(err, match=match):
        get_model(name, **kw)


def test_bad_ids_are_refused(weights):
    m = get_model("jax/opt-custom", path=weights, progress=False)
    with pytest.raises(ValueError, match="lie in"):
        m(np.array([[2, 10_000]]))
    with pytest.raises(TypeError, match="integers"):
        m(np.array([[0.5]]))
    with pytest.raises(TypeError, match="unsupported"):
        m.generate(input_ids=np.array([[2]]), max_new_tokens=2, temprature=0.5)


def test_greedy_equals_hf_across_the_live_cache_bucket(hf_dir):
    """Prompt 122 + 14 new tokens crosses the 128-position attention bucket mid-dispatch."""
    cfg = CONFIGS["pre_ln"].replace(max_position_embeddings=256)
    src, hf = hf_dir(cfg)
    m = get_model("jax/x", path=src, progress=False)
    ids, mask = left_padded_batch(cfg, [122, 100], seed=5)
    ours = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14,
                      steps_per_dispatch=4)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=14, do_sample=False).numpy()
    np.testing.assert_array_equal(ours, ref)
