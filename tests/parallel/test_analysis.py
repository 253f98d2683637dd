import jax
import pytest

from optkit.parallel import TENSOR_RULES
from optkit.parallel.analysis import StageJob, compile_job, unpartitioned_flops
from tests.conftest import CONFIGS

CFG = CONFIGS["pre_ln"]
RULES = tuple(sorted(TENSOR_RULES.items()))


def prefill_job(tp: int, quantize=None) -> StageJob:
    return StageJob("prefill", 1, tp, RULES, 2, 64, 64, True, True, 2, "float32", quantize)


def matmul_flops(cfg, tokens: int) -> float:
    """Flops of the layers' projections alone (attention scores and LM head left out)."""
    h = cfg.hidden_size
    return 2 * tokens * cfg.num_hidden_layers * (4 * h * h + 2 * h * cfg.ffn_dim)


def test_flops_per_device_split_over_the_tensor_axis():
    one = compile_job(CFG, prefill_job(1), jax.devices()).flops
    two = compile_job(CFG, prefill_job(2), jax.devices()).flops
    assert one >= matmul_flops(CFG, 2 * 64)
    assert two == pytest.approx(one / 2, rel=0.05)


def test_unpartitioned_flops_split_over_devices_match_the_compiled_ones():
    """What the planner uses off CPU (XLA:GPU counts no flops for cuBLAS GEMMs)."""
    job = prefill_job(2)
    flops = unpartitioned_flops(CFG, job)
    assert flops >= matmul_flops(CFG, 2 * 64)
    assert flops / 2 == pytest.approx(compile_job(CFG, job, jax.devices()).flops, rel=0.05)


def test_int8_job_takes_int8_kernels():
    """An int8 job's arguments hold 1-byte kernels (plus fp32 scales) where the full-precision
    job holds 4-byte ones."""
    full = compile_job(CFG, prefill_job(2), jax.devices())
    int8 = compile_job(CFG, prefill_job(2, "int8"), jax.devices())
    h, f = CFG.hidden_size, CFG.ffn_dim
    kernels = CFG.num_hidden_layers * (4 * h * h + 2 * h * f) / 2
    scales = CFG.num_hidden_layers * ((3 * h + f) / 2 + 2 * h) * 4
    assert full.argument - int8.argument == pytest.approx(3 * kernels - scales, rel=0.01)
