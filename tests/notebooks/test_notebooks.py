"""Every notebook runs headlessly (papermill, a kernel of this Python) on opt-tiny, with
parameters injected; each test checks that the parameters reached the output files.

All share one xdist worker (and the tiny weights); each starts its own kernel."""

import math

import nbformat
import pytest

from optkit.bench.report import make_report, run_notebook
from optkit.bench.results import read_rows

pytestmark = pytest.mark.xdist_group("notebooks")


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if kind in o.get("data", {})]


@pytest.mark.parametrize("params", [
    {"source": "hf"},
    {"source": "metaseq", "layout": "v1_20230405", "parts": 2, "shards": 1},
])
def test_01_convert_weights(tmp_path, params):
    nb = run_notebook("01_convert_weights", tmp_path / "out.ipynb",
                      {"work_dir": "work", **params}, cwd=tmp_path)
    (row,) = read_rows(tmp_path / "work" / "check.csv").to_dict("records")
    assert row["source"] == params["source"] and row["model"] == "opt-tiny"
    if params["source"] == "metaseq":
        assert (row["layout"], row["parts"]) == ("v1_20230405", 2)
        assert row["checkpoint_files"] >= 2  # one file per model-parallel part
    assert row["max_abs_logit_diff"] < 1e-3 and row["same_argmax"]
    assert (tmp_path / "work" / "opt-tiny-np").is_dir()
    assert nb.metadata.papermill.parameters["source"] == params["source"]


def test_03_benchmark_sweep_report(tmp_path, tiny_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = make_report("report", {"model": "opt-tiny", "path": tiny_path,
                                   "batch_sizes": [1, 3], "prompt_len": 4, "new_tokens": 3,
                                   "repeats": 1, "baseline_backend": ""}, progress=False)
    assert {"sweep.csv", "sweep.jsonl", "throughput.png", "roofline.png", "speedup.png",
            "report.ipynb", "report.html"} <= set(paths)
    df = read_rows(tmp_path / "report" / "sweep.csv")
    assert list(df["batch_size"]) == [1, 3] and set(df["model_name"]) == {"jax/opt-tiny"}
    assert (df["prompt_len"] == 4).all() and (df["new_tokens"] == 3).all()
    assert df["speedup"][0] == 1.0 and (df["baseline_id"] == df["cfg_id"][0]).all()
    assert len(read_rows(tmp_path / "report" / "sweep.jsonl")) == 2
    nb = nbformat.read(tmp_path / "report" / "report.ipynb", as_version=4)
    assert len(outputs(nb, "image/png")) == 3
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "run_sweep" not in html


def test_04_interactive_generation(tmp_path, tiny_path):
    nb = run_notebook("04_interactive_generation", tmp_path / "out.ipynb",
                      {"model": "opt-tiny", "path": tiny_path, "prompt": "Hello there",
                       "temperature": 0.0, "max_new_tokens": 6, "autorun": True,
                       "transcript": str(tmp_path / "t.txt")}, cwd=tmp_path)
    text = (tmp_path / "t.txt").read_text()
    assert text.startswith("Hello there") and len(text) > len("Hello there")
    assert outputs(nb, "application/vnd.jupyter.widget-view+json")  # the panel
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "6 tokens in" in printed


def test_05_serving_load(tmp_path, tiny_path):
    run_notebook("05_serving_load", tmp_path / "out.ipynb",
                 {"model": "opt-tiny", "path": tiny_path, "rates": [5, 40],
                  "num_requests": 4, "prompt_len": "uniform:4:8", "output_len": "4",
                  "max_slots": 4, "output_dir": "serving"}, cwd=tmp_path)
    df = read_rows(tmp_path / "serving" / "load.csv")
    assert list(df["rate"]) == [5, 40] and (df["completed"] == 4).all()
    assert (df["num_requests"] == 4).all() and (df["mean_output_tokens"] <= 4).all()
    assert all(math.isfinite(v) for v in df["ttft_p99_ms"])
    assert len(read_rows(tmp_path / "serving" / "requests.jsonl")) == 8
    assert (tmp_path / "serving" / "load.png").stat().st_size > 10_000


def test_02_parallel_strategies(tmp_path):
    """On 4 of the 8 fake CPU devices: candidates, the best two measured, the choice."""
    nb = run_notebook("02_parallel_strategies", tmp_path / "out.ipynb",
                      {"model": "opt-tiny", "batch": 2, "prompt_len": 4, "gen_len": 3,
                       "num_devices": 4, "measure_top": 2, "repeats": 1,
                       "output_dir": "parallel"}, cwd=tmp_path)
    out = tmp_path / "parallel"
    cands = read_rows(out / "candidates.csv")
    assert cands["devices"].max() <= 4 and (cands["status"] == "chosen").sum() == 1
    ranked = list(cands[cands["status"].isin(["chosen", "fits"])]["plan"][:2])
    measured = read_rows(out / "measured.csv")
    assert list(measured["resolved_plan"]) == ranked
    assert (measured["batch_size"] == 2).all() and (measured["new_tokens"] == 3).all()
    assert measured["num_devices"].max() <= 4 and (measured["decode_step_ms"] > 0).all()
    assert (out / "strategies_estimated.png").exists()
    assert (out / "strategies_measured.png").exists()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    chosen = cands[cands["status"] == "chosen"]["plan"].iloc[0]
    assert "chosen plan:" in printed and chosen in printed
