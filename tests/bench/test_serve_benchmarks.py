"""benchmarks/serve_gpu.py and benchmarks/serve_cpu.py at tiny scale on the CPU, so the
scripts the GPU rows come from keep running; and the request-length synthesizer."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sg():
    return _script("serve_gpu")


# Workloads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,inp,out", [("sharegpt", 161.31, 337.99), ("alpaca", 19.31, 58.45)])
def test_synthesized_lengths_have_the_published_means(sg, name, inp, out):
    for n, tol in ((4000, 0.01), (256, 0.03)):
        p, o = sg.synthesize_lengths(name, n, max_context=2048, seed=1)
        assert p.mean() == pytest.approx(inp, rel=tol)
        assert o.mean() == pytest.approx(out, rel=tol)
        assert p.min() >= 1 and o.min() >= 1 and (p + o).max() <= 2048
    assert sg.DATASETS[name].input_mean == inp and sg.DATASETS[name].output_mean == out
    p2, o2 = sg.synthesize_lengths(name, 256, max_context=2048, seed=1)
    p3, _ = sg.synthesize_lengths(name, 256, max_context=2048, seed=2)
    assert (p2 == p).all() and (o2 == o).all() and not (p3 == p).all()
    spread = np.percentile(o, 99) / np.median(o)
    assert spread > 3  # a heavy right tail, not a constant


def test_lengths_respect_a_small_context(sg):
    p, o = sg.synthesize_lengths("sharegpt", 500, max_context=256)
    assert (p + o).max() <= 256 and p.min() >= 1 and o.min() >= 1
    with pytest.raises(ValueError, match="unknown dataset"):
        sg.synthesize_lengths("dolly", 4)


def test_workloads(sg):
    w = sg.make_workload("uniform", 50, 2048, 50272, uniform_prompt=(32, 512),
                         uniform_output=128)
    lens = [len(p) for p in w.prompts]
    assert min(lens) >= 32 and max(lens) <= 512 and set(w.max_tokens) == {128}
    assert all(p[0] == 2 and 4 <= min(p[1:]) and max(p) < 50000 for p in w.prompts)
    assert w.prompt_spec == "uniform:32:512" and w.output_spec == "128"
    again = sg.make_workload("uniform", 50, 2048, 50272)
    assert again.prompts == w.prompts  # the same requests for every framework
    small = sg.make_workload("uniform", 20, 100, 50272)  # clipped into the context
    assert small.max_context <= 100
    s = sg.make_workload("sharegpt", 64, 2048, 50272)
    d = s.describe()
    assert d["num_requests"] == 64 and d["workload_max_context"] <= 2048
    assert s.prompt_spec.startswith("lognormal:") and "Fig. 11" in d["length_source"]
    sub = sg.warmup_subset(s, 8)
    lens = [len(p) for p in s.prompts]
    sub_lens = [len(p) for p in sub.prompts]
    assert min(lens) in sub_lens and max(lens) in sub_lens and len(sub.prompts) <= 10
    assert max(s.max_tokens) in sub.max_tokens
    assert sg.warmup_subset(s, 0) is s
    cut = sg.warmup_subset(s, 8, max_tokens=16)
    assert cut.prompts == sub.prompts and max(cut.max_tokens) == 16 < max(s.max_tokens)
    assert sg.warmup_subset(s, 0, max_tokens=16).max_tokens == [min(m, 16)
                                                                 for m in s.max_tokens]


# Measurement ----------------------------------------------------------------------------------
def test_record_follows_loadgen_definitions(sg):
    r = sg.Record(0, [2, 5, 6], 4, send_at=0.5)
    r.t_submit = 10.0
    for t, k in ((10.1, 1), (10.3, 3), (10.4, 4)):
        r.deliver(t, k)
    r.deliver(10.5, 4)  # no new token: not a delivery
    r.finish(10.4, "length")
    r.finish(11.0, "error", "late")  # the first finish stands
    d = r.result(t0=9.5)
    assert d["ttft_s"] == pytest.approx(0.1) and d["tpot_s"] == pytest.approx(0.1)
    assert d["itl_s"] == pytest.approx([0.1, 0.1, 0.1]) and d["chunks"] == 3
    assert d["e2e_s"] == pytest.approx(0.4) and d["start_s"] == pytest.approx(0.5)
    assert d["output_tokens"] == 4 and d["error"] is None
    cancelled = sg.Record(1, [2], 4)
    cancelled.t_submit = 1.0
    cancelled.finish(2.0, "cancelled")
    assert cancelled.result(0.0)["error"] == "finished with 'cancelled'"
    assert sg.decode_batch([r]) == {"batch_reached": 1, "mean_decode_batch": 1.0}
    other = sg.Record(2, [2], 2)
    other.deliver(10.2, 1)
    other.deliver(10.6, 2)
    b = sg.decode_batch([r, other])
    assert b["batch_reached"] == 2 and b["mean_decode_batch"] == pytest.approx(0.7 / 0.5)


def test_parse_options(sg):
    assert sg.parse_options(["max_num_seqs=4", "kind=paged", "x=1.5"]) == {
        "max_num_seqs": 4, "kind": "paged", "x": 1.5}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sg.parse_options(["4"])


# The whole script at tiny scale ---------------------------------------------------------------
def test_serve_gpu_tiny_on_cpu(sg, tmp_path):
    n = 6
    argv = ["--models", "opt-tiny", "--in-process", "--num-requests", str(n),
            "--workloads", "alpaca", "--online-workload", "alpaca", "--rates", "8",
            "--online-seconds", "1", "--online-min-requests", "4",
            "--engine-opt", "max_num_seqs=4", "--hf-opt", "num_blocks=8",
            "--hf-opt", "max_batch_tokens=256", "--stall-stream-tokens", "120",
            "--stall-delay", "0.1", "--chunk-tokens", "32", "--step-tokens", "4",
            "--warmup-requests", "3", "--out", str(tmp_path),
            # no part is skipped or cut for time on a machine slowed by other jobs
            "--budget-s", "3600", "--drain-s", "600"]
    assert sg.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / sg.ROWS).read_text().splitlines()]
    mine = [r for r in rows if r["framework"] == "optkit"]
    kinds = [r["kind"] for r in mine]
    # one engine serves every part; the ideal bound is timed after it is freed
    assert kinds == ["ceiling", "offline", "stall", "online", "slo_capacity", "ideal"], kinds
    off = mine[1]
    work = sg.make_workload("alpaca", n, 256, 50272)
    assert off["completed"] == n and off["failed"] == 0 and off["mismatched_outputs"] == 0
    assert off["generated_tokens"] == sum(work.max_tokens)
    assert 1 <= off["batch_reached"] <= 4 and off["warmup_s"] > 0
    assert off["engine_config"]["max_num_seqs"] == 4 and off["card"] and off["jax"]
    assert off["ttft_p99_ms"] >= off["ttft_p50_ms"] > 0
    online = mine[3]
    assert online["rate"] == 8 and online["num_requests"] == n and online["failed"] == 0
    cap = mine[4]
    assert cap["rates_tested"] == [8] and cap["slo_ttft_ms"] == 1000
    assert cap["max_rate_within_slo"] in (None, 8)
    st = mine[2]
    assert st["long_prompt"] == 248 and st["stream_error"] is None and st["long_error"] is None
    assert st["chunk_prefill_ms"] > 0 and st["long_prefill_alone_ms"] > 0
    assert st["stream_median_gap_ms"] <= st["stream_max_gap_ms"]
    ideal = mine[5]
    assert ideal["batch"] == off["batch_reached"] and ideal["step_batch"] == ideal["batch"]
    assert ideal["ideal_s"] == pytest.approx(ideal["prefill_ideal_s"] + ideal["decode_ideal_s"])
    assert ideal["fraction_of_ideal"] == pytest.approx(ideal["ideal_s"] / off["duration_s"])
    assert ideal["decode_steps_ideal"] >= max(work.max_tokens) - 1
    # HF's continuous batching either served every request or its failures are in the rows
    hf = [r for r in rows if r["framework"] == "hf"]
    assert hf and not any(r["kind"] == "error" and r.get("part") == "worker" for r in hf)
    for r in hf:
        if r["kind"] in ("offline", "online"):
            assert r["completed"] == r["num_requests"] or r["first_error"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| opt-tiny | alpaca | optkit | 6 |" in summary
    for png in ("throughput_vs_rate.png", "latency_vs_rate.png"):
        assert (tmp_path / png).stat().st_size > 1000
    again = tmp_path / "again"
    assert sg.main(["--report", str(tmp_path / sg.ROWS), "--out", str(again)]) == 0
    assert (again / "summary.md").read_text() == summary


def test_serve_gpu_capacity_table_bounds_a_framework_within_no_rate(sg, tmp_path):
    """A framework within the SLOs at none of its rates shows '< lowest rate', and the
    ratio is then a lower bound."""
    base = {"kind": "slo_capacity", "model": "opt-6.7b", "workload": "sharegpt",
            "slo_ttft_ms": 1000.0, "slo_tpot_ms": 50.0, "card": "GPU"}
    rows = [{**base, "framework": "optkit", "rates_tested": [2, 4, 8, 16],
             "max_rate_within_slo": 16.0},
            {**base, "framework": "hf", "rates_tested": [0.5, 1, 2], "max_rate_within_slo": None}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sg.main(["--report", str(path), "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| 2, 4, 8, 16 | 16.00 | > 32.00 |" in summary
    assert "| 0.5, 1, 2 | < 0.5 (none within) | - |" in summary
    rows[1]["max_rate_within_slo"] = 2.0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sg.main(["--report", str(path), "--out", str(tmp_path)]) == 0
    assert "| 2, 4, 8, 16 | 16.00 | 8.00 |" in (tmp_path / "summary.md").read_text()


def test_serve_gpu_rejects_bad_arguments(sg, tmp_path):
    with pytest.raises(SystemExit, match="unknown OPT model"):
        sg.main(["--models", "opt-7b", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        sg.main(["--models", "opt-tiny", "--engine-opt", "slots", "--out", str(tmp_path)])


def test_serve_cpu_tiny(tmp_path):
    sc = _script("serve_cpu")
    assert sc.main(["--model", "jax/opt-tiny", "--max-tokens", "4", "--repeats", "1",
                    "--no-defaults", "--server-args", "--max-num-seqs 2 --max-len 64 --no-warmup",
                    "--out", str(tmp_path)]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "serve_cpu.jsonl").read_text()
              .splitlines()]
    assert row["completed"] == 1 and row["failed"] == 0
    assert row["server_args"] == "--max-num-seqs 2 --max-len 64 --no-warmup"
    assert 1 <= row["completion_tokens"] <= 4
    assert row["generate_tokens"] == row["completion_tokens"]
    assert row["same_text"], (row["server_text"], row["generate_text"])
    assert row["ratio"] == pytest.approx(row["e2e_p50_ms"] / 1e3 / row["generate_s"])
    summary = (tmp_path / "serve_cpu.md").read_text()
    assert "| --max-num-seqs 2 --max-len 64 --no-warmup |" in summary
