"""Sweeps with a stand-in benchmark (exact numbers): grid, YAML, baselines, order, resume."""

import hashlib

import pytest

from optkit.bench.core import BenchConfig, cfg_id
from optkit.bench.results import read_rows
from optkit.bench.sweep import baselines, grid, load_sweep, run_sweep


class FakeRun:
    """tokens/s = 100 * batch (x2 on facebook); records the order of calls; can fail."""

    def __init__(self, fail=(), interrupt_after=None):
        self.calls, self.fail, self.interrupt_after = [], set(fail), interrupt_after

    def __call__(self, cfg, cache=None, peaks=None):
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append(cfg)
        if cfg.batch_size in self.fail:
            raise RuntimeError(f"out of memory at batch {cfg.batch_size}")
        tps = 100.0 * cfg.batch_size * (2 if cfg.backend == "facebook" else 1)
        return {"cfg_id": cfg_id(cfg), **cfg.to_dict(), "model_name": cfg.name,
                "tokens_per_s": tps, "decode_step_ms": 1000.0 * cfg.batch_size / tps}


def test_grid_is_the_cartesian_product_last_axis_fastest():
    cfgs = grid({"model": "opt-tiny", "new_tokens": 4}, backend=["jax", "facebook"],
                batch_size=[1, 2, 4])
    assert [(c.backend, c.batch_size) for c in cfgs] == [
        ("jax", 1), ("jax", 2), ("jax", 4), ("facebook", 1), ("facebook", 2), ("facebook", 4)]
    assert all(c.new_tokens == 4 and c.model == "opt-tiny" for c in cfgs)
    assert grid(BenchConfig(model="opt-tiny"), dtype="float32")[0].dtype == "float32"
    with pytest.raises(ValueError, match="unknown grid axes"):
        grid({}, batchsize=[1])
    with pytest.raises(ValueError, match="empty"):
        grid({}, batch_size=[])


def test_cfg_id_is_stable():
    a = BenchConfig(model="opt-tiny", batch_size=4)
    assert cfg_id(a) == cfg_id({"batch_size": 4, "model": "opt-tiny"})
    assert cfg_id(a) == cfg_id(a.replace(label="renamed"))   # labels are not identity
    assert cfg_id(a) != cfg_id(a.replace(batch_size=8))
    assert cfg_id(BenchConfig(model="jax/opt-tiny")) == cfg_id(BenchConfig(model="opt-tiny"))
    # defaults are left out of the key, so the id is the hash of the two non-defaults (a
    # change of hashing or of a default would break resuming old result files)
    assert cfg_id(a) == cfg_id(BenchConfig(model="opt-tiny", batch_size=4, repeats=3))
    assert cfg_id(a) == hashlib.sha1(b'{"batch_size": 4, "model": "opt-tiny"}').hexdigest()[:12]
    assert cfg_id(a) == "43e1983f9cc6"


def test_yaml_sweep(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("output: out.csv\nbase: {model: opt-tiny, prompt_len: 8}\n"
                    "grid: {batch_size: [1, 2]}\ncfgs: [{batch_size: 16, label: big}]\n"
                    "baseline: {backend: facebook}\n")
    s = load_sweep(path)
    assert [c.batch_size for c in s.cfgs] == [1, 2, 16]
    assert s.cfgs[2].label == "big" and all(c.prompt_len == 8 for c in s.cfgs)
    assert s.baseline == {"backend": "facebook"} and s.output == "out.csv"
    path.write_text("grids: {}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_sweep(path)
    path.write_text("base: {modle: opt-tiny}\n")
    with pytest.raises(ValueError, match="unknown benchmark config keys"):
        load_sweep(path)


def test_baseline_rules():
    cfgs = grid({"model": "opt-tiny"}, batch_size=[1, 2])
    assert baselines(cfgs) == [cfgs[0]] * 2
    assert baselines(cfgs, 1) == [cfgs[1]] * 2
    assert baselines(cfgs, False) == [None, None]
    assert [b.backend for b in baselines(cfgs, {"backend": "facebook"})] == ["facebook"] * 2
    with pytest.raises(TypeError):
        baselines(cfgs, "facebook")


def test_sweep_baseline_ratios_order_and_outputs(tmp_path):
    cfgs = grid({"model": "opt-tiny"}, batch_size=[1, 2, 4])
    run = FakeRun()
    csv, jsonl = tmp_path / "s.csv", tmp_path / "s.jsonl"
    df = run_sweep(cfgs, output=[csv, jsonl], baseline={"backend": "facebook"}, run=run,
                   progress=False, log=lambda s: None)
    # baselines (facebook) run first, grouped, so each model loads once
    assert [(c.backend, c.batch_size) for c in run.calls] == [
        ("facebook", 1), ("facebook", 2), ("facebook", 4), ("jax", 1), ("jax", 2), ("jax", 4)]
    jax = df[df["backend"] == "jax"]
    assert list(jax["speedup"]) == [0.5, 0.5, 0.5]
    assert list(jax["baseline_tokens_per_s"]) == [200.0, 400.0, 800.0]
    assert list(jax["decode_speedup"]) == [0.5, 0.5, 0.5]
    fb = df[df["backend"] == "facebook"]
    assert list(fb["speedup"]) == [1.0] * 3 and (fb["baseline_id"] == fb["cfg_id"]).all()
    for path in (csv, jsonl):
        back = read_rows(path)
        assert sorted(back["cfg_id"]) == sorted(df["cfg_id"])

    # the default baseline is the first config: scaling over batch 1
    df = run_sweep(cfgs, output=None, run=FakeRun(), progress=False, log=lambda s: None)
    assert list(df["speedup"]) == [1.0, 2.0, 4.0]


def test_sweep_resumes_after_interrupt_and_retries_failures(tmp_path):
    cfgs = grid({"model": "opt-tiny"}, batch_size=[1, 2, 4, 8])
    out = tmp_path / "s.csv"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfgs, output=out, run=FakeRun(fail={2}, interrupt_after=3),
                  progress=False, log=lambda s: None)
    rows = read_rows(out)
    assert list(rows["batch_size"]) == [1, 2, 4]
    assert "out of memory" in rows["error"][1] and rows["error"].isna()[[0, 2]].all()

    run = FakeRun()
    df = run_sweep(cfgs, output=out, run=run, progress=False, log=lambda s: None)
    assert [c.batch_size for c in run.calls] == [2, 8]  # the failed one and the rest
    assert list(df["batch_size"]) == [1, 2, 4, 8]
    assert list(df["speedup"]) == [1.0, 2.0, 4.0, 8.0]  # baseline row read back from the file
    assert len(read_rows(out)) == 5  # 3 from the first run, 2 new

    run = FakeRun()
    run_sweep(cfgs, output=out, run=run, progress=False, log=lambda s: None)
    assert run.calls == []  # everything done
    run_sweep(cfgs[:1], output=out, run=run, resume=False, progress=False, log=lambda s: None)
    assert len(run.calls) == 1


def test_sweep_errors(tmp_path):
    cfgs = grid({"model": "opt-tiny"}, batch_size=[1, 2])
    with pytest.raises(RuntimeError, match="out of memory"):
        run_sweep(cfgs, output=None, run=FakeRun(fail={2}), on_error="raise", progress=False,
                  log=lambda s: None)
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        run_sweep(cfgs, output=tmp_path / "x.parquet", run=FakeRun(), progress=False)
    with pytest.raises(ValueError, match="no configs"):
        run_sweep([], output=None)
