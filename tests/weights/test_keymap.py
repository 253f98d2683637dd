import numpy as np
import pytest

from optkit.weights.keymap import KEY_MAP, map_key, map_source_keys, take_part, to_hf_key
from optkit.weights.layout import folder_shapes
from tests.conftest import CONFIGS


def test_every_folder_key_has_one_rule():
    cfg = CONFIGS["post_ln_proj"].replace(do_layer_norm_before=True)
    for key in folder_shapes(cfg):
        assert len(map_key("alpa", key)) == 1, key


def test_hf_names_with_and_without_model_prefix():
    assert map_key("hf", "model.decoder.final_layer_norm.weight")[0].folder_key == \
        "decoder.layer_norm.weight"
    assert map_key("hf", "decoder.project_in.weight")[0].folder_key == \
        "decoder.project_in_dim.weight"
    assert map_key("hf", "lm_head.weight") == []
    assert to_hf_key("decoder.layers.3.fc1.bias") == "model.decoder.layers.3.fc1.bias"
    assert to_hf_key("decoder.layer_norm.bias", prefix="") == "decoder.final_layer_norm.bias"


def test_metaseq_fused_qkv_is_split_k_v_q():
    targets = map_key("metaseq", "decoder.layers.7.self_attn.qkv_proj.weight")
    assert {t.folder_key: t.part for t in targets} == {
        "decoder.layers.7.self_attn.k_proj.weight": 0,
        "decoder.layers.7.self_attn.v_proj.weight": 1,
        "decoder.layers.7.self_attn.q_proj.weight": 2}
    fused = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(take_part(fused, 2), fused[4:])
    assert map_key("metaseq", "decoder.version") == []


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match="transformer.h.0"):
        map_source_keys("hf", ["model.decoder.embed_tokens.weight", "transformer.h.0.attn"])


def test_map_is_declarative():
    assert all(r.folder and r.hf for r in KEY_MAP)
