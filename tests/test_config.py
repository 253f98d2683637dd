import json

import pytest
import torch
from transformers import OPTConfig as HFConfig
from transformers import OPTForCausalLM

from optkit.config import PRESETS, OPTConfig, canonical_name

NOMINAL = {"opt-125m": 125e6, "opt-350m": 350e6, "opt-1.3b": 1.3e9, "opt-2.7b": 2.7e9,
           "opt-6.7b": 6.7e9, "opt-13b": 13e9, "opt-30b": 30e9, "opt-66b": 66e9,
           "opt-175b": 175e9}


@pytest.mark.parametrize("name", list(NOMINAL))
def test_preset_parameter_count_matches_published_size(name):
    cfg = OPTConfig.from_name(name)
    n = cfg.num_params()
    # the published names round the count: within 6% (opt-350m has 331M parameters)
    assert abs(n - NOMINAL[name]) / NOMINAL[name] < 0.06, (name, n)
    # and exactly what HF transformers builds for that config (on the meta device)
    with torch.device("meta"):
        hf = OPTForCausalLM(HFConfig(**cfg.to_hf_dict()))
    assert n == sum(p.numel() for p in hf.parameters()), name


def test_published_counts():
    assert PRESETS["opt-125m"].num_params() == 125_239_296
    assert PRESETS["opt-350m"].num_params() == 331_196_416
    assert 174e9 < PRESETS["opt-175b"].num_params() < 176e9


def test_opt_350m_architecture():
    c = PRESETS["opt-350m"]
    assert c.word_embed_proj_dim == 512 and c.has_projections
    assert not c.do_layer_norm_before and not c.has_final_layer_norm


@pytest.mark.parametrize("alias,expected", [
    ("facebook/opt-1.3b", "opt-1.3b"), ("alpa/opt-iml-30b", "opt-30b"),
    ("jax/opt-iml-max-1.3b", "opt-1.3b"), ("opt-175b", "opt-175b"), ("OPT-125M", "opt-125m"),
    ("opt-2.7b-np", "opt-2.7b")])
def test_names_and_opt_iml_aliases(alias, expected):
    assert canonical_name(alias) == expected
    assert OPTConfig.from_name(alias) == PRESETS[expected]


def test_unknown_name_lists_known_sizes():
    with pytest.raises(ValueError, match="opt-125m"):
        OPTConfig.from_name("opt-7b")


def test_hf_config_json_round_trip(tmp_path):
    for cfg in PRESETS.values():
        p = tmp_path / "config.json"
        cfg.save_json(p)
        assert OPTConfig.from_json(p) == cfg
        hf = HFConfig(**json.loads(p.read_text()))
        assert hf.word_embed_proj_dim == cfg.word_embed_proj_dim
        assert hf.do_layer_norm_before == cfg.do_layer_norm_before


def test_reads_an_hf_saved_config(tmp_path):
    HFConfig(hidden_size=48, num_attention_heads=3, ffn_dim=96, num_hidden_layers=1,
             vocab_size=300, word_embed_proj_dim=24,
             do_layer_norm_before=False).save_pretrained(tmp_path)
    cfg = OPTConfig.from_json(tmp_path / "config.json")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.word_embed_proj_dim) == (48, 3, 24)
    assert cfg.has_projections and not cfg.do_layer_norm_before


@pytest.mark.parametrize("bad", [
    {"model_type": "gpt2"}, {"activation_function": "gelu"},
    {"hidden_size": 10, "num_attention_heads": 3}])
def test_rejects_unsupported_configs(bad):
    base = PRESETS["opt-125m"].to_hf_dict()
    base.update(bad)
    with pytest.raises(ValueError):
        OPTConfig.from_hf_dict(base)


def test_missing_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="ffn_dim"):
        OPTConfig.from_hf_dict({"model_type": "opt", "vocab_size": 10, "hidden_size": 8,
                                "num_hidden_layers": 1, "num_attention_heads": 2})
