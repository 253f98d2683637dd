"""The format facts of spec §1.4-1.7, checked against the published 175B numbers."""

import pytest

from optkit.config import OPTConfig
from optkit.weights.metaseq.format import (
    LAYER_PARAMS,
    flat_layout,
    local_shape,
    metaseq_shapes,
    shard_sizes,
    split_dim,
)


def test_175b_flat_layout_matches_the_published_metadata():
    layout = flat_layout(OPTConfig.from_name("opt-175b"), 8)
    root, layer = layout[0], layout[1]
    assert root.fsdp_path == "" and root.flat_key == "flat_param_0"
    assert list(zip(root.names, root.shapes, strict=True)) == [
        ("decoder.embed_tokens.weight", (6284, 12288)),
        ("decoder.embed_positions.weight", (2050, 12288)),
        ("decoder.layer_norm.weight", (12288,)), ("decoder.layer_norm.bias", (12288,))]
    assert layer.fsdp_path == "decoder.layers.0"
    assert layer.flat_key == "decoder.layers.0.flat_param_0"
    assert layer.names == LAYER_PARAMS
    assert layer.shapes == ((4608, 12288), (4608,), (12288, 1536), (12288,), (12288,), (12288,),
                            (6144, 12288), (6144,), (12288, 6144), (12288,), (12288,), (12288,))
    assert len(layout) == 97
    assert (root.numel, layer.numel) == (102_432_768, 226_576_896)
    c, real = shard_sizes(layer.numel, 124)
    assert (c, c - real[-1]) == (1_827_234, 120)
    c, real = shard_sizes(root.numel, 124)
    assert (c, c - real[-1]) == (826_071, 36)


def test_shard_sizes_pad_and_leave_trailing_ranks_empty():
    assert shard_sizes(10, 3) == (4, [4, 4, 2])
    assert shard_sizes(10, 8) == (2, [2, 2, 2, 2, 2, 0, 0, 0])  # torch.chunk gives 5 chunks
    assert shard_sizes(12, 4) == (3, [3, 3, 3, 3])


def test_350m_root_holds_the_projections_and_no_final_layer_norm():
    root = metaseq_shapes(OPTConfig.from_name("opt-350m"))[""]
    assert root == (("decoder.embed_tokens.weight", (50272, 512)),
                    ("decoder.project_in_dim.weight", (1024, 512)),
                    ("decoder.embed_positions.weight", (2050, 1024)),
                    ("decoder.project_out_dim.weight", (512, 1024)))


@pytest.mark.parametrize("key,dim", [
    ("decoder.layers.3.self_attn.qkv_proj.weight", 0),
    ("decoder.layers.3.self_attn.qkv_proj.bias", 0),
    ("decoder.layers.3.self_attn.k_proj.weight", 0),
    ("decoder.layers.3.fc1.weight", 0), ("decoder.layers.3.fc1.bias", 0),
    ("decoder.layers.3.fc2.weight", 1), ("decoder.layers.3.self_attn.out_proj.weight", 1),
    ("decoder.layers.3.fc2.bias", None), ("decoder.layers.3.self_attn.out_proj.bias", None),
    ("decoder.layers.3.self_attn_layer_norm.weight", None),
    ("decoder.layers.3.final_layer_norm.bias", None), ("decoder.layer_norm.weight", None),
    ("decoder.embed_tokens.weight", 0), ("decoder.embed_positions.weight", None),
    ("decoder.project_in_dim.weight", None), ("decoder.version", None),
])
def test_model_parallel_rules(key, dim):
    assert split_dim(key) == dim


def test_local_shape_refuses_uneven_splits():
    assert local_shape("decoder.layers.0.fc2.weight", (64, 256), 4) == (64, 64)
    with pytest.raises(ValueError, match="not divisible"):
        local_shape("decoder.embed_tokens.weight", (997, 64), 2)
