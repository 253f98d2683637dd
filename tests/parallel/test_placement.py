"""Shardings come from the rule tables through rules.logical_sharding (and Placement)."""

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from optkit.config import OPTConfig
from optkit.parallel import TENSOR_RULES, Placement
from optkit.parallel.rules import logical_sharding

CFG = OPTConfig(vocab_size=1001, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=128, max_position_embeddings=64, name="t-place")


def mesh(dp, tp):
    return Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("data", "tensor"))


def test_logical_sharding_follows_the_rules():
    m = mesh(2, 2)
    spec = lambda axes, shape: logical_sharding(m, TENSOR_RULES, axes, shape).spec  # noqa: E731
    assert spec(("batch", None, "heads", None), (4, 8, 4, 16)) == \
        PartitionSpec("data", None, "tensor", None)
    # a dim its mesh axes do not divide stays whole; so does an unnamed or unmapped one
    assert spec(("vocab", "embed"), (1001, 64)) == PartitionSpec(None, None)
    assert spec(("batch", "embed"), (3, 64)) == PartitionSpec(None, None)
    # a mesh axis splits one dim only
    assert spec(("heads", "mlp"), (4, 128)) == PartitionSpec("tensor", None)
    # abstract meshes (the planner's memory model) take the same function
    am = AbstractMesh((2, 2), ("data", "tensor"))
    assert logical_sharding(am, TENSOR_RULES, ("mlp",), (128,)).shard_shape((128,)) == (64,)


def test_placement_places_params_cache_and_batches():
    place = Placement(CFG, mesh(2, 2), TENSOR_RULES)
    cache = place.cache(4, 16)
    assert len(cache["k"]) == CFG.num_hidden_layers
    assert cache["k"][0].spec == PartitionSpec("data", None, "tensor", None)
    assert cache["mask"].spec == PartitionSpec("data", None)
    assert place.batch((4, 7)).spec == PartitionSpec("data", None)
    assert place.logits((4, 1000)).spec == PartitionSpec("data", "tensor")
    assert place.embed_lookup is None  # 1001 rows: the vocabulary is not split
    assert Placement(CFG.replace(vocab_size=1000), mesh(1, 2), TENSOR_RULES).embed_lookup
