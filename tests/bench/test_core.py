"""``run_benchmark``: one real (opt-tiny) measurement, its row, the cost model and the cache."""

import numpy as np
import pytest

from optkit.bench.core import (
    BenchConfig,
    ModelCache,
    decode_step_cost,
    prompt_batch,
    run_benchmark,
)
from optkit.config import OPTConfig

PEAKS = {"peak_gbyte_per_s": 10.0, "peak_tflops": 0.05}


def test_config_validation():
    c = BenchConfig(model="facebook/opt-tiny")
    assert (c.backend, c.model, c.name) == ("facebook", "opt-tiny", "facebook/opt-tiny")
    with pytest.raises(ValueError, match="backend"):
        BenchConfig(backend="tpu")
    with pytest.raises(ValueError, match="plan= applies to the alpa backend"):
        BenchConfig(plan="dp=2")
    with pytest.raises(ValueError, match="batch_size"):
        BenchConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown OPT model"):
        BenchConfig(model="opt-7b")
    BenchConfig(model="my-finetune", path="/weights")  # any name when weights are given
    with pytest.raises(ValueError, match="jax and alpa backends"):
        BenchConfig(model="facebook/opt-tiny", quantize="int8")
    with pytest.raises(ValueError, match="facebook backend"):
        BenchConfig(model="jax/opt-tiny", hf_cache="static")
    with pytest.raises(ValueError, match="hf_cache"):
        BenchConfig(model="facebook/opt-tiny", hf_cache="dynamic")


def test_decode_step_cost_by_hand():
    cfg = OPTConfig(vocab_size=10, hidden_size=4, num_hidden_layers=2, num_attention_heads=2,
                    ffn_dim=8, max_position_embeddings=16)
    flops, nbytes = decode_step_cost(cfg, batch=3, context=5, itemsize=2)
    per_row = 2 * 2 * (4 * 16 + 2 * 4 * 8) + 2 * 4 * 10 + 4 * 4 * 2 * 5
    assert flops == 3 * per_row
    assert nbytes == cfg.num_params() * 2 + 2 * 2 * 3 * 5 * 4 * 2


def test_prompts_are_seeded():
    c = BenchConfig(model="opt-tiny", batch_size=2, prompt_len=5)
    ids, mask = prompt_batch(c, 1000)
    assert ids.shape == (2, 5) and mask.all() and (ids[:, 0] == 2).all()
    assert (prompt_batch(c, 1000)[0] == ids).all()
    assert not (prompt_batch(c.replace(seed=1), 1000)[0] == ids).all()


def test_run_benchmark_row(tiny_path):
    cache = ModelCache()
    cfg = BenchConfig(model="opt-tiny", path=tiny_path, batch_size=2, prompt_len=6,
                      new_tokens=5, repeats=2, label="t")
    row = run_benchmark(cfg, cache=cache, peaks=PEAKS)
    mcfg = OPTConfig.from_name("opt-tiny")
    # the config is in the row
    assert (row["model"], row["backend"], row["batch_size"], row["prompt_len"],
            row["new_tokens"], row["label"]) == ("opt-tiny", "jax", 2, 6, 5, "t")
    assert row["model_name"] == "jax/opt-tiny" and row["resolved_dtype"] == "float32"
    # timings are consistent with each other
    assert row["tokens_per_s"] == pytest.approx(2 * 5 / row["latency_s"])
    assert row["compile_s"] == pytest.approx(row["warmup_s"] - row["latency_s"])
    assert 0 < row["ttft_s"] < row["latency_s"]
    assert row["decode_tokens_per_s"] == pytest.approx(2e3 / row["decode_step_ms"])
    # memory: fp32 weights on one device; KV cache for prompt + generated positions
    assert row["param_bytes_per_device"] == mcfg.num_params() * 4
    assert row["kv_cache_bytes"] == mcfg.kv_cache_bytes(2, 11, 4)
    assert row["num_devices"] == 1 and row["params"] == mcfg.num_params()
    # roofline with the given peaks
    bound = max(row["step_gflop"] / (1e3 * PEAKS["peak_tflops"]),
                row["step_gbyte"] / PEAKS["peak_gbyte_per_s"])
    assert row["roofline_fraction"] == pytest.approx(bound / (row["decode_step_ms"] / 1e3))
    assert row["floor_ms"] == pytest.approx(row["step_gbyte"] / PEAKS["peak_gbyte_per_s"] * 1e3)
    assert row["tflops"] == pytest.approx(row["step_gflop"] / row["decode_step_ms"])
    # environment
    for key in ("jax_device", "jax", "torch", "python", "optkit", "timestamp", "cpu_count"):
        assert row[key] is not None
    # the cache hands the same model to another shape; a new dtype loads another one
    model = cache.get(cfg)[0]
    row2 = run_benchmark(cfg.replace(batch_size=1), cache=cache, peaks=None)
    assert cache.get(cfg.replace(batch_size=1))[0] is model
    assert row2["roofline_fraction"] is None and row2["batch_size"] == 1
    cache.get(cfg.replace(dtype="bfloat16"))
    assert len(cache.models) == 1 and cfg.model_key() not in cache.models


def test_public_options_reach_the_model(tiny_path):
    """quantize= is get_model's: the int8 model's step reads fewer bytes; the torch model
    has no compile time."""
    base = BenchConfig(model="opt-tiny", path=tiny_path, prompt_len=4, new_tokens=3,
                       repeats=1)
    fp = run_benchmark(base, peaks=None)
    q = run_benchmark(base.replace(quantize="int8", kernels="xla"), peaks=None)
    assert q["quantize"] == "int8" and q["kernels"] == "xla"
    assert q["step_gbyte"] < fp["step_gbyte"]  # int8 kernels (the embedding stays)
    hf = run_benchmark(base.replace(backend="facebook"), peaks=None)
    assert hf["compile_s"] is None and hf["warmup_s"] > 0


def test_run_benchmark_checks_length(tiny_path):
    with pytest.raises(ValueError, match="exceeds"):
        run_benchmark(BenchConfig(model="opt-tiny", path=tiny_path, prompt_len=250,
                                  new_tokens=10), peaks=None)


def test_measured_peaks_are_positive():
    from optkit.bench.roofline import device_peaks

    p = device_peaks()
    assert p["peak_gbyte_per_s"] > 0.1 and p["peak_tflops"] > 1e-4
    assert np.isfinite([p["peak_gbyte_per_s"], p["peak_tflops"]]).all()


@pytest.mark.parametrize("plan, devices, most", [
    ("dp=1,tp=2", 2, 0.55),        # everything split over tensor (norms, biases replicated)
    ("dp1-tp1-pp2-mb1", 2, 0.99),  # each stage: the (tied) embedding and one of two layers
])
def test_alpa_plans(tiny_path, plan, devices, most):
    """Plans on the fake CPU devices: the row names the plan, counts devices and the weights
    on the most loaded one."""
    cfg = BenchConfig(model="alpa/opt-tiny", plan=plan, path=tiny_path, batch_size=2,
                      prompt_len=4, new_tokens=3, repeats=1)
    row = run_benchmark(cfg, peaks=None)
    full = OPTConfig.from_name("opt-tiny").num_params() * 4
    assert row["num_devices"] == devices and row["plan"] == plan
    assert row["resolved_plan"] == {"dp=1,tp=2": "dp1-tp2-pp1"}.get(plan, plan)
    assert 0.4 * full < row["param_bytes_per_device"] < most * full
    assert row["tokens_per_s"] > 0
