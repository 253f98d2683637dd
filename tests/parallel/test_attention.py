"""Decode attention choice: the fused kernel (interpreted on fake CPU devices) under every
kind of plan gives the XLA path's logits; 'auto' keeps XLA off GPUs."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from optkit import get_model
from optkit.config import OPTConfig
from optkit.parallel import Plan, build_executor
from optkit.parallel.attention import check_attention, resolve_attention
from optkit.parallel.executor import single_device_mesh
from tests.conftest import left_padded_batch

CFG = OPTConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=128, max_position_embeddings=64, name="t-attn")
KV = PartitionSpec(None, None, None, None)


def decode_logits(plan, attention, steps=4):
    ex = build_executor(CFG, plan, None, dtype="float32", progress=False, attention=attention)
    ids, mask = left_padded_batch(CFG, [7, 3, 5, 6], seed=1)
    cache = ex.init_cache(4, 16)
    logits, cache = ex.prefill(ids, mask, cache)
    out = []
    for i in range(steps):
        tok = np.asarray(logits).argmax(-1)
        logits, cache = ex.decode(tok, cache, live=ids.shape[1] + i + 1)
        out.append(np.asarray(logits))
    return np.stack(out)


@pytest.mark.parametrize("plan", [Plan(), Plan(tp=2), Plan(dp=2, tp=2),
                                  Plan(pp=2, micro_batches=2)], ids=lambda p: p.name)
def test_kernel_matches_xla_under_plans(plan):
    np.testing.assert_allclose(decode_logits(plan, "pallas"), decode_logits(plan, "xla"),
                               atol=1e-5)


def test_kernel_needs_no_live_buckets():
    """The kernel stops at each row's index: one compilation serves every live length."""
    for attention, want in (("xla", 128), ("pallas", 300)):
        ex = build_executor(CFG, Plan(), None, dtype="float32", progress=False,
                            attention=attention)
        assert ex.live_bucket(40, ex.init_cache(2, 300)) == want


def test_decode_loop_with_kernel():
    """Several steps per dispatch (the kernel inside the jitted loop) generate the same."""
    m = {a: get_model("alpa/opt-t-attn", dummy=True, config=CFG, plan=Plan(tp=2),
                      progress=False, attention=a) for a in ("xla", "pallas")}
    ids, mask = left_padded_batch(CFG, [5, 2], seed=3)
    outs = [m[a].generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                          steps_per_dispatch=4) for a in ("xla", "pallas")]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_auto_is_xla_off_gpus_and_pallas_refuses_what_it_cannot_run():
    mesh = single_device_mesh()
    assert jax.devices()[0].platform == "cpu"
    assert resolve_attention("auto", CFG, mesh, KV) == "xla"
    assert resolve_attention("pallas", CFG, mesh, KV) == "pallas"
    odd = CFG.replace(hidden_size=80, num_attention_heads=4)  # head size 20
    assert resolve_attention("auto", odd, mesh, KV) == "xla"
    with pytest.raises(ValueError, match="power of two"):
        resolve_attention("pallas", odd, mesh, KV)
    with pytest.raises(ValueError, match="sequence"):
        resolve_attention("pallas", CFG, mesh, PartitionSpec(None, "tensor", None, None))
    with pytest.raises(ValueError, match="choose one of"):
        check_attention("flash")
