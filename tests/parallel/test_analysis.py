import dataclasses

import jax
import pytest

from optkit.parallel import TENSOR_RULES, analysis
from optkit.parallel.analysis import StageJob, compile_job
from tests.conftest import CONFIGS

CFG = CONFIGS["pre_ln"]
RULES = tuple(sorted(TENSOR_RULES.items()))


def prefill_job(tp: int) -> StageJob:
    return StageJob("prefill", 1, tp, RULES, 2, 64, 64, True, True, 2, "float32")


def matmul_flops(cfg, tokens: int) -> float:
    """Flops of the layers' projections alone (attention scores and LM head left out)."""
    h = cfg.hidden_size
    return 2 * tokens * cfg.num_hidden_layers * (4 * h * h + 2 * h * cfg.ffn_dim)


def test_flops_per_device_split_over_the_tensor_axis():
    one = compile_job(CFG, prefill_job(1), jax.devices()).flops
    two = compile_job(CFG, prefill_job(2), jax.devices()).flops
    assert one >= matmul_flops(CFG, 2 * 64)
    assert two == pytest.approx(one / 2, rel=0.05)


def test_flops_kept_where_the_compiled_analysis_leaves_out_matmuls(monkeypatch):
    # XLA:GPU counts no flops for GEMMs run as cuBLAS/Triton custom calls.
    full = compile_job(CFG, prefill_job(2), jax.devices()).flops
    real = analysis.cost_of
    monkeypatch.setattr(analysis, "cost_of",
                        lambda compiled, n: dataclasses.replace(real(compiled, n), flops=0.0))
    assert compile_job(CFG, prefill_job(2), jax.devices()).flops == pytest.approx(full, rel=0.05)
