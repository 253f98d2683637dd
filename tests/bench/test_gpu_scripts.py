"""benchmarks/gpu_decode.py and plot_gpu.py: public options only, both row formats read alike."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def parsed(**kw):
    import argparse

    return argparse.Namespace(**{"dtype": "float16", "reps": 3, "devices": 1, "plan": "tp",
                                 "kernels": "auto", **kw})


def test_frameworks_are_public_options():
    gd = script("gpu_decode")
    c = gd.bench_config("optkit-int8", "6.7b", parsed(kernels="xla"), 16, 128, 128)
    assert (c.name, c.quantize, c.kernels, c.plan, c.dtype) == (
        "jax/opt-6.7b", "int8", "xla", None, "float16")
    c = gd.bench_config("optkit", "13b", parsed(devices=2), 1, 128, 128)
    assert (c.name, c.plan, c.quantize) == ("alpa/opt-13b", "dp=1,tp=2,pp=1", None)
    assert gd.bench_config("optkit", "66b", parsed(devices=4, plan="auto"), 1, 8, 8).plan == \
        "auto"
    c = gd.bench_config("hf-static-compile", "1.3b", parsed(), 64, 128, 128)
    assert (c.name, c.hf_cache, c.batch_size) == ("facebook/opt-1.3b", "static", 64)
    assert gd.bench_config("hf-eager", "1.3b", parsed(), 1, 8, 8).hf_cache is None


def test_unknown_framework_is_an_error(capsys):
    with pytest.raises(SystemExit):
        script("gpu_decode").main(["--frameworks", "optkit,vllm"])
    assert "unknown frameworks ['vllm']" in capsys.readouterr().err


def test_old_and_new_rows_make_one_table(tmp_path):
    pg = script("plot_gpu")
    old = [{"framework": "optkit", "size": "1.3b", "batch": 16, "devices": 1, "step_ms": 2.0,
            "floor_ms": 1.0, "variant": "default"},
           {"framework": "optkit", "size": "1.3b", "batch": 16, "step_ms": 9.0,
            "floor_ms": 1.0, "variant": "default+other"},
           {"framework": "optkit", "size": "1.3b", "batch": 1, "prompt": 2048,
            "prefill_ms": 30.0}]
    new = [{"framework": "hf-static-compile", "model": "opt-1.3b", "batch_size": 16,
            "num_devices": 1, "decode_step_ms": 5.0, "floor_ms": 1.0},
           {"framework": "optkit", "model": "opt-13b", "batch_size": 1, "num_devices": 2,
            "decode_step_ms": 4.0, "floor_ms": 3.0}]
    paths = []
    for name, rows in (("old.jsonl", old), ("new.jsonl", new)):
        paths.append(tmp_path / name)
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = pg.decode_rows(*paths)
    assert sorted(df["model"]) == ["opt-1.3b", "opt-1.3b", "opt-13b on 2 GPUs"]
    table = pg.decode_table(df)
    assert "| opt-1.3b | 16 | optkit | 2.00 | 1.00 | 50 | 5.00 | 2.50× |" in table
    assert "| opt-13b on 2 GPUs | 1 | optkit | 4.00 | 3.00 | 75 |  |  |" in table
    assert pg.main([str(p) for p in paths] + ["--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").stat().st_size > 5000
