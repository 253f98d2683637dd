"""The vocabulary-split token lookup: the same rows as a plain take, under tensor and
data x tensor meshes, and no all-gather of the table in a decode step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optkit import model as M
from optkit.config import OPTConfig
from optkit.options import ModelOptions
from optkit.parallel import Plan, build_executor
from optkit.parallel.lookup import vocab_lookup

F32 = ModelOptions(dtype="float32")

CFG = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=128, max_position_embeddings=64, name="t-lookup")


def mesh(dp, tp):
    return Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("data", "tensor"))


@pytest.mark.parametrize("dp,tp,vocab_axes", [(1, 2, "tensor"), (2, 2, "tensor"),
                                              (1, 4, "tensor"), (2, 2, ("data", "tensor"))])
def test_lookup_matches_take(dp, tp, vocab_axes):
    m = mesh(dp, tp)
    table_spec = PartitionSpec(vocab_axes, None)
    rows_split = "data" if vocab_axes == "tensor" and dp > 1 else None
    lookup = vocab_lookup(m, table_spec, lambda shape: PartitionSpec(rows_split))
    table = jax.random.normal(jax.random.key(0), (64, 8), jnp.float16)
    ids = np.array([[0, 15, 16, 31], [32, 47, 48, 63], [1, 63, 0, 17], [5, 5, 40, 62]],
                   np.int32)  # every shard's first and last rows
    got = jax.jit(lookup)(jax.device_put(table, NamedSharding(m, table_spec)),
                          jax.device_put(ids, NamedSharding(m, PartitionSpec(rows_split))))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[ids])


def test_ids_split_over_the_vocabulary_axis_are_gathered_first():
    m = mesh(1, 2)
    lookup = vocab_lookup(m, PartitionSpec("tensor", None), lambda shape: PartitionSpec("tensor"))
    table = jnp.arange(32.0).reshape(16, 2)
    ids = np.array([[0, 15], [8, 7]], np.int32)
    got = jax.jit(lookup)(jax.device_put(table, NamedSharding(m, PartitionSpec("tensor"))),
                          jax.device_put(ids, NamedSharding(m, PartitionSpec("tensor"))))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[ids])


def test_no_placed_lookup_without_a_vocab_split():
    spec = lambda shape: PartitionSpec()  # noqa: E731
    assert vocab_lookup(mesh(1, 2), PartitionSpec(None, None), spec) is None
    assert vocab_lookup(mesh(1, 1), PartitionSpec("tensor", None), spec) is None
    assert build_executor(CFG, Plan(), None, options=F32,
                          progress=False).embed_lookup is None
    assert build_executor(CFG, Plan(dp=2), None, options=F32,
                          progress=False).embed_lookup is None


def test_tensor_parallel_decode_never_gathers_the_table():
    ex = build_executor(CFG, Plan(tp=2), None, options=F32, progress=False)
    assert ex.embed_lookup is not None
    cache = ex.init_cache(2, 16)
    tok = ex.put_batch(np.array([3, 400], np.int32))
    fn = jax.jit(lambda p, x, c: M.decode_step(p, CFG, x, c, lookup=ex.embed_lookup))
    hlo = fn.lower(ex.params, tok, cache).compile().as_text()
    shapes = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather", hlo)
    assert not [s for s in shapes if int(s.split(",")[0]) >= CFG.vocab_size // 2], shapes
    assert "all-reduce" in hlo
