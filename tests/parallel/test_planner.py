"""The automatic planner: abstract compiles, memory budget, refusals, DataFrame, CLI."""

import numpy as np
import pandas as pd
import pytest

from optkit import get_model
from optkit.cli import main
from optkit.config import PRESETS
from optkit.parallel import Cluster, Plan, PlanError, auto_plan
from optkit.parallel.devices import GiB, match_preset, parse_size
from optkit.parallel.planner import CostModel, enumerate_plans
from optkit.weights.random import write_random_folder
from tests.conftest import CONFIGS, left_padded_batch
from tests.parallel.test_strategies import WIDE

TINY = PRESETS["opt-tiny"]
#: One workload and plan set for the small-model tests: their compiles are shared (memo).
KW = dict(batch=4, prompt_len=16, gen_len=4, dtype="float16", progress=False)
PLANS = [Plan(), Plan(tp=2), Plan(dp=2), Plan(pp=2, micro_batches=2), Plan(tp=8),
         Plan(pp=4), Plan(dp=8)]


def analytic_bytes(cfg, tp, pp, batch, positions, itemsize=2):
    """Weights + KV cache per device of the worst stage, by plain arithmetic."""
    h, f, v = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    layer = (4 * h * h + 2 * h * f) / tp + 3 * h / tp + f / tp + 6 * h  # sharded + replicated
    per_stage = -(-cfg.num_hidden_layers // pp)
    ends = v * h / tp + (cfg.num_positions * h if pp > 1 else cfg.num_positions * h + 2 * h)
    kv = 2 * per_stage * batch * positions * h / tp
    return (per_stage * layer + ends + kv) * itemsize


@pytest.mark.parametrize("case", [
    # (model, cluster, plans, chosen): the seed's 4 x 8 V100-16GB needs 32 fake CPU devices,
    # more than this process has, so its stages compile in a subprocess
    ("opt-175b", Cluster.preset("V100-16GB", 32, per_host=8), [Plan(tp=8, pp=4), Plan(tp=8)],
     Plan(tp=8, pp=4)),
    ("opt-175b", Cluster.preset("A100-80GB", 8), [Plan(tp=8)], Plan(tp=8)),
    ("opt-66b", Cluster.preset("A100-80GB", 2), [Plan(tp=2)], Plan(tp=2)),
], ids=["175b-32xV100", "175b-8xA100", "66b-2xA100"])
def test_big_models_compiled_memory_matches_analytic(case):
    model, cluster, plans, chosen = case
    cfg = PRESETS[model]
    report = auto_plan(cfg, batch=1, prompt_len=128, gen_len=32, dtype="float16",
                       cluster=cluster, plans=plans, progress=False)
    best = report.chosen
    assert best.plan == chosen.replace(dtype="float16")
    assert best.extrapolated  # 1- and 2-layer compiles, extrapolated to the stage depth
    assert best.memory <= cluster.budget
    expected = analytic_bytes(cfg, chosen.tp, chosen.pp, 1, 160)
    assert abs(best.memory - expected) / expected < 0.05
    assert abs(best.analytic - expected) / expected < 0.05
    assert best.prefill > 0 and best.decode > 0
    # decode of a 16-bit model is bound by reading its weights once per token
    floor = best.weights / (cluster.device.hbm_bandwidth * CostModel().bandwidth_efficiency)
    assert floor * chosen.pp <= best.decode < 3 * floor * chosen.pp
    for c in report.candidates:
        if c is not best:
            assert c.status == "over budget" and "alone need" in c.reason


def int8_analytic_bytes(cfg, tp, batch, positions):
    """Per-device bytes of an int8 model under tp (int8 kernels, fp32 scales, fp16 rest)."""
    h, f, v = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    kernels = (4 * h * h + 2 * h * f) / tp
    scales = (3 * h + f) / tp + 2 * h
    rest = 3 * h / tp + f / tp + 6 * h
    ends = v * h / tp + cfg.num_positions * h + 2 * h
    kv = 2 * cfg.num_hidden_layers * batch * positions * h / tp
    return cfg.num_hidden_layers * (kernels + 4 * scales + 2 * rest) + 2 * (ends + kv)


def test_int8_weights_planned_where_fp16_ones_do_not_fit():
    """OPT-175B on 2 x H200: refused in fp16 (with a pointer to int8), planned in int8 at
    the int8 model's bytes, its decode bound by reading them."""
    cfg, cluster = PRESETS["opt-175b"], Cluster.preset("H200-141GB", 2)
    with pytest.raises(PlanError, match="quantize=int8"):
        auto_plan(cfg, dtype="float16", cluster=cluster, plans=[Plan(tp=2)], progress=False)
    report = auto_plan(cfg, dtype="float16", cluster=cluster, plans=[Plan(tp=2)],
                       quantize="int8", progress=False)
    best = report.chosen
    assert best.plan == Plan(tp=2, dtype="float16") and "int8" in report.header()
    expected = int8_analytic_bytes(cfg, 2, 1, 160)
    assert abs(best.analytic - expected) / expected < 0.01
    assert abs(best.memory - expected) / expected < 0.05
    assert "int8 weights/device" in report.best.describe(cfg, quantize="int8")
    floor = best.weights / cluster.device.hbm_bandwidth
    assert floor <= best.decode < 3 * floor
    assert report.to_frame()["quantize"].tolist() == ["int8"]


def test_refuses_clearly_when_nothing_fits():
    with pytest.raises(PlanError, match=r"no plan for opt-175b \(float16, batch 1, 160 "
                                        r"positions\) fits 8 x V100-16GB with a budget of 14.40 "
                                        r"GiB/device: the smallest, dp1-tp8-pp1, needs 4"):
        auto_plan("opt-175b", dtype="float16", cluster=Cluster.preset("V100-16GB", 8),
                  progress=False)


def test_cli_refusal_and_output(capsys, tmp_path):
    rc = main(["plan", "--model", "opt-175b", "--devices", "8", "--device-memory", "16GiB"])
    err = capsys.readouterr().err
    assert rc == 1 and "assuming V100-16GB" in err and "no plan for opt-175b" in err
    csv = tmp_path / "c.csv"
    rc = main(["plan", "--model", "opt-tiny", "--devices", "2", "--device", "H100-80GB",
               "--plan", "dp=1,tp=1,pp=1", "--plan", "tp=2", "--batch", "4",
               "--prompt-len", "16", "--gen-len", "4", "--csv", str(csv)])
    out = capsys.readouterr().out
    assert rc == 0 and "chosen" in out and "chosen plan:" in out
    assert len(pd.read_csv(csv)) == 2
    rc = main(["plan", "--model", "opt-tiny", "--devices", "2", "--device", "H100-80GB",
               "--plan", "tp=2", "--quantize", "int8"])
    out = capsys.readouterr().out
    assert rc == 0 and "with int8 matmul kernels" in out and "int8 weights/device" in out


def test_never_picks_a_plan_over_budget():
    cluster = Cluster.preset("A100-80GB", 8)
    first = auto_plan(TINY, cluster=cluster, plans=PLANS, **KW)
    fits = [c for c in first.candidates if c.fits]
    assert len(fits) == 4 and all(c.memory > c.analytic for c in fits)  # + temporaries
    fast = first.chosen
    # a budget between the fastest plan's analytic and compiled need: the compile rejects it
    budget = (fast.analytic + fast.memory) / 2
    tight = Cluster(cluster.device.replace(memory=int(budget / 0.9) + 1), 8)
    second = auto_plan(TINY, cluster=tight, plans=PLANS, **KW)
    again = next(c for c in second.candidates if c.plan == fast.plan)
    assert again.status == "over budget" and "compiled peak" in again.reason
    assert second.chosen.memory <= tight.budget
    assert second.best != fast.plan
    for c in second.candidates:
        assert (c.status in ("chosen", "fits")) == (c.memory is not None and
                                                     c.memory <= tight.budget)


def test_candidates_as_dataframe():
    report = auto_plan(TINY, cluster=Cluster.preset("H100-80GB", 8), plans=PLANS, **KW)
    df = report.to_frame()
    assert isinstance(df, pd.DataFrame) and len(df) == len(PLANS)
    assert df.loc[0, "status"] == "chosen" and df.loc[0, "plan"] == report.best.name
    assert {"dp", "tp", "pp", "micro_batches", "memory_gib", "analytic_gib", "prefill_ms",
            "decode_ms", "tokens_per_s", "reason"} <= set(df.columns)
    fits = df[df.status.isin(["chosen", "fits"])]
    assert len(fits) == 4 and (fits.memory_gib <= fits.budget_gib).all()
    assert fits.total_s.iloc[1:].is_monotonic_increasing
    assert fits.total_s.iloc[0] <= 1.02 * fits.total_s.min()  # near-ties go to fewer devices
    invalid = df.set_index("plan")[df.status.values == "invalid"]
    assert invalid.reason.to_dict() == {
        "dp1-tp8-pp1": "tp=8 does not divide the 4 attention heads of opt-tiny: tensor "
                       "parallelism splits whole heads; use tp in [1, 2, 4]",
        "dp1-tp1-pp4-mb1": "pp=4 stages need at least one layer each, but opt-tiny has 2 "
                           "layers; use pp <= 2",
        "dp8-tp1-pp1": "micro-batches of [4] rows do not split over dp=8 (rows would be "
                       "computed redundantly)"}
    assert invalid.memory_gib.isna().all()
    text = str(report)
    assert "chosen plan:" in text and report.best.name in text


def test_enumeration_covers_the_strategy_space():
    plans = enumerate_plans(TINY, 8, batch=4)
    shapes = {(p.dp, p.tp, p.pp) for p in plans}
    assert (8, 1, 1) in shapes and (1, 8, 1) in shapes and (2, 2, 2) in shapes
    assert (1, 1, 1) in shapes  # fewer devices are candidates too
    assert {p.micro_batches for p in plans if p.pp == 4} == {1, 4}
    assert all(8 % p.num_devices == 0 for p in plans)
    only = enumerate_plans(TINY, 8, batch=4, all_devices=True)
    assert all(p.num_devices == 8 for p in only)


def test_get_model_uses_the_automatic_plan(tmp_path):
    """alpa/ without a plan: the planner's choice among plans using all 8 devices."""
    cfg = CONFIGS["pre_ln"]
    write_random_folder(tmp_path / "opt-auto-np", cfg, seed=1, dtype=np.float32, progress=False)
    m = get_model("alpa/opt-auto", path=tmp_path, progress=False)
    assert m.plan.num_devices == 8 and m.plan.tp == 4 and m.plan.pp == 2  # 4 heads, 2 layers
    ref = get_model("jax/opt-auto", path=tmp_path, progress=False)
    ids, mask = left_padded_batch(cfg, [5, 3], seed=2)
    np.testing.assert_array_equal(
        m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6),
        ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6))


def test_measure_reranks_on_real_devices():
    report = auto_plan(CONFIGS["pre_ln"], batch=2, prompt_len=8, gen_len=4,
                       plans=[Plan(), Plan(tp=2)],
                       measure=True, measure_top=2, progress=False)
    measured = [c for c in report.candidates if c.measured_decode is not None]
    assert len(measured) == 2 and report.chosen in measured
    assert report.chosen.total == min(c.total for c in measured)
    assert report.chosen.total == pytest.approx(
        report.chosen.measured_prefill + 3 * report.chosen.measured_decode)
    assert "measured" in report.chosen.reason
    with pytest.raises(ValueError, match="measure=True needs real devices"):
        auto_plan(WIDE, cluster=Cluster.preset("A100-80GB", 2), measure=True)


def test_device_descriptions():
    assert parse_size("16GiB") == 16 * GiB and parse_size("900GB/s") == 900e9
    assert parse_size("100Gb/s") == 12.5e9 and parse_size("125T") == 125e12
    assert match_preset("NVIDIA H100 80GB HBM3").name == "H100-80GB"
    assert match_preset("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    assert match_preset("Tesla V100-SXM2-32GB").name == "V100-32GB"
    c = Cluster.preset("V100-16GB", 32, per_host=8)
    assert c.hosts == 4 and c.spans_hosts(4, 8) and not c.spans_hosts(8, 8)
    with pytest.raises(ValueError, match="unknown device"):
        Cluster.preset("TPU-v9", 4)
