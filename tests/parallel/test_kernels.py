"""Decode kernel choice: the Pallas kernels (interpreted on fake CPU devices) under every
kind of plan give the XLA path's logits; 'auto' keeps XLA off GPUs."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from optkit import get_model
from optkit.config import OPTConfig
from optkit.options import Kernels, ModelOptions
from optkit.parallel import Plan, build_executor
from optkit.parallel.executor import single_device_mesh
from optkit.parallel.kernels import matvec_fns, resolve_attention
from tests.conftest import left_padded_batch

CFG = OPTConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=128, max_position_embeddings=64, name="t-attn")
KV = PartitionSpec(None, None, None, None)
PLANS = [Plan(), Plan(tp=2), Plan(dp=2, tp=2), Plan(pp=2, micro_batches=2)]


def decode_logits(plan, kernels, steps=4, quantize=None, rows=(7, 3, 5, 6), cfg=CFG,
                  dtype="float32"):
    options = ModelOptions(dtype=dtype, quantize=quantize, kernels=kernels)
    ex = build_executor(cfg, plan, None, options=options, progress=False)
    ids, mask = left_padded_batch(cfg, list(rows), seed=1)
    cache = ex.init_cache(len(rows), 16)
    logits, cache = ex.prefill(ids, mask, cache)
    out = []
    for i in range(steps):
        tok = np.asarray(logits).argmax(-1)
        logits, cache = ex.decode(tok, cache, live=ids.shape[1] + i + 1)
        out.append(np.asarray(logits))
    return np.stack(out)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_attention_kernel_matches_xla_under_plans(plan):
    np.testing.assert_allclose(decode_logits(plan, "attention"), decode_logits(plan, "xla"),
                               atol=1e-5)


def test_auto_on_gpus_takes_attention(monkeypatch):
    from optkit.parallel import kernels

    monkeypatch.setattr(kernels, "on_gpus", lambda mesh: True)
    assert resolve_attention(Kernels(), CFG, single_device_mesh(), KV) == "pallas"


def test_kernel_sets_take_the_named_kernels(monkeypatch):
    """Names joined by commas: those kernels and no others (each called on every layer)."""
    from optkit.kernels import decode_attention

    calls = []
    real = decode_attention.decode_attention
    monkeypatch.setattr(decode_attention, "decode_attention",
                        lambda *a, **k: (calls.append("attention"), real(*a, **k))[1])
    both = ModelOptions(dtype="float32", quantize="int8", kernels="attention,matvec")
    ex = build_executor(CFG, Plan(tp=2), None, options=both, progress=False)
    kern = ex.decode_kernels(4, 16)
    assert kern["attention"] and sorted(kern["matvec"]) == ["fc1", "fc2", "out", "qkv"]
    one = ModelOptions(dtype="float32", quantize="int8", kernels="attention")
    kern = build_executor(CFG, Plan(tp=2), None, options=one, progress=False).decode_kernels(4, 16)
    assert kern["attention"] and kern["matvec"] is None
    np.testing.assert_allclose(decode_logits(Plan(tp=2), "attention", steps=1),
                               decode_logits(Plan(tp=2), "xla", steps=1), atol=1e-5)
    assert calls.count("attention") == 2  # two layers


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_int8_kernels_match_xla_under_plans(plan, monkeypatch):
    """Both kernels on an int8 model; the int8 product hooks take 2 rows here (the CUDA-core
    kernel's default is one), partial sums psum'ed where tensor parallelism splits a kernel's
    inputs."""
    from optkit.parallel import kernels

    real = kernels.matvec_fns

    def two_rows(*a, **k):
        fns = real(*a, **k)
        return fns and {n: mv._replace(max_rows=2) for n, mv in fns.items()}

    monkeypatch.setattr(kernels, "matvec_fns", two_rows)
    kw = {"quantize": "int8", "rows": (7, 3)}
    np.testing.assert_allclose(decode_logits(plan, "pallas", **kw),
                               decode_logits(plan, "xla", **kw), atol=1e-4)


@pytest.mark.parametrize("plan", [Plan(), Plan(tp=2)], ids=lambda p: p.name)
def test_fp16_int8_products_take_the_tensor_core_kernel(plan, monkeypatch):
    """fp16 inputs and kernels its blocks tile: optkit.kernels.int8_mma, a batch's rows in
    one call (fc2 split along K; out's tensor-parallel shard, 128 inputs, is not its: XLA's
    product takes those 3 rows), the same logits as XLA's products up to fp16 rounding."""
    from optkit.kernels import int8_mma

    cfg = OPTConfig(vocab_size=500, hidden_size=256, num_hidden_layers=2,
                    num_attention_heads=4, ffn_dim=1024, max_position_embeddings=64,
                    name="t-mma")
    calls, real = [], int8_mma.int8_mma

    def spy(x, q, *args, **kw):
        calls.append((x.shape[0], q.shape, kw["split"]))
        return real(x, q, *args, **kw)

    monkeypatch.setattr(int8_mma, "int8_mma", spy)
    kw = {"quantize": "int8", "rows": (5, 3, 6), "cfg": cfg, "dtype": "float16", "steps": 2}
    got = decode_logits(plan, "matvec", **kw)
    assert set(calls) == ({(3, (768, 256), 1), (3, (256, 256), 1), (3, (1024, 256), 1),
                           (3, (256, 1024), 2)} if plan.tp == 1 else
                          {(3, (384, 256), 1), (3, (512, 256), 1), (3, (256, 512), 2)})
    np.testing.assert_allclose(got, decode_logits(plan, "xla", **kw), atol=2e-2)


def test_tensor_core_rows_only_for_fp16_models(monkeypatch):
    """The hook takes a batch's 32 rows where the tensor-core kernel tiles the kernel (at any
    size: its least size holds for one row only) and the model is fp16."""
    from optkit.kernels import int8_mma

    mesh = single_device_mesh()
    q = {"fc1": ((1024, 256), PartitionSpec(None, None)),
         "out": ((256, 4, 64), PartitionSpec(None, None, None)),
         "fc2": ((256, 128), PartitionSpec(None, None))}  # K = 128: no 256-wide blocks
    for dtype, want in (("float16", {"fc1": 32, "out": 32}), ("float32", {})):
        fns = matvec_fns(Kernels.parse("matvec"), CFG, mesh, q, int8=True, dtype=dtype)
        assert {n: f.max_rows for n, f in fns.items() if f.max_rows > 1} == want
        assert all(f.max_rows == 1 for n, f in fns.items() if n not in want)
    assert int8_mma.plan(1024, 256) is None  # one row: the CUDA-core kernel


def test_kernel_needs_no_live_buckets():
    """The kernel stops at each row's index: one compilation serves every live length."""
    for kernels, want in (("xla", 128), ("attention", 300), ("matvec", 128)):
        options = ModelOptions(dtype="float32", quantize="int8", kernels=kernels)
        ex = build_executor(CFG, Plan(), None, options=options, progress=False)
        assert ex.live_bucket(40, ex.init_cache(2, 300)) == want
        matvec = ex.decode_kernels(2, 300)["matvec"]
        assert (sorted(matvec) if matvec else None) == (
            ["fc1", "fc2", "out", "qkv"] if kernels == "matvec" else None)


def test_decode_loop_with_kernels():
    """Several steps per dispatch (the kernels inside the jitted loop) generate the same."""
    m = {a: get_model("alpa/opt-t-attn", dummy=True, config=CFG, plan=Plan(tp=2),
                      progress=False, kernels=a, quantize="int8") for a in ("xla", "pallas")}
    ids, mask = left_padded_batch(CFG, [5], seed=3)
    outs = [m[a].generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                          steps_per_dispatch=4) for a in ("xla", "pallas")]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_auto_is_xla_off_gpus_and_named_kernels_refuse_what_they_cannot_run():
    mesh = single_device_mesh()
    auto, pallas, pallas8 = Kernels(), Kernels.parse("pallas"), Kernels.parse("pallas", int8=True)
    assert jax.devices()[0].platform == "cpu"
    assert resolve_attention(auto, CFG, mesh, KV) == "xla"
    assert resolve_attention(pallas, CFG, mesh, KV) == "pallas"
    assert resolve_attention(Kernels.parse("matvec"), CFG, mesh, KV) == "xla"
    odd = CFG.replace(hidden_size=80, num_attention_heads=4)  # head size 20
    assert resolve_attention(auto, odd, mesh, KV) == "xla"
    with pytest.raises(ValueError, match="power of two"):
        resolve_attention(pallas, odd, mesh, KV)
    with pytest.raises(ValueError, match="sequence"):
        resolve_attention(Kernels.parse("attention"), CFG, mesh,
                          PartitionSpec(None, "tensor", None, None))
    q = {"fc1": ((128, 64), PartitionSpec(None, None))}
    assert matvec_fns(auto, CFG, mesh, q, int8=True) is None
    assert matvec_fns(pallas, CFG, mesh, q, int8=False) is None
    assert set(matvec_fns(pallas8, CFG, mesh, q, int8=True)) == {"fc1"}
    with pytest.raises(ValueError, match="not int8"):
        matvec_fns(Kernels.parse("matvec"), CFG, mesh, q, int8=False)
    with pytest.raises(ValueError, match="no block tiling"):
        matvec_fns(Kernels.parse("matvec"), CFG, mesh,
                   {"fc1": ((128, 40), PartitionSpec(None, None))}, int8=True)
