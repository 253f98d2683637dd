"""``optkit bench textgen``: the FLOP formula, the summary, and an end-to-end CLI run."""

import json

import pytest

from optkit.bench.roofline import decode_step_cost, generation_flops, prefill_flops
from optkit.bench.textgen import summarize, summary_markdown
from optkit.cli import main
from optkit.config import OPTConfig


def test_flops_formula_by_hand():
    cfg = OPTConfig(vocab_size=10, hidden_size=4, num_hidden_layers=2, num_attention_heads=2,
                    ffn_dim=8)
    # prompt 3, 2 new tokens: 4 tokens through the layers, 2 LM-head positions,
    # attention pairs 1 + 2 + 3 (prefill) + 4 (one decode step) = 10
    per_token = 2 * 2 * (4 * 16 + 2 * 4 * 8)
    expect = per_token * 4 + 4 * 4 * 2 * 10 + 2 * 4 * 10 * 2
    assert generation_flops(cfg, 1, 3, 2) == expect
    assert generation_flops(cfg, 5, 3, 2) == 5 * expect
    proj = cfg.replace(word_embed_proj_dim=2)  # opt-350m-style projections add 2EH per use
    assert generation_flops(proj, 1, 3, 2) == per_token * 4 + 4 * 4 * 2 * 10 + \
        2 * 2 * 10 * 2 + 2 * 2 * 4 * (4 + 2)


def rows_for(model, bs, latencies, tokens=8):
    return [{"model": model, "batch_size": bs, "phase": "warmup" if i == 0 else "measure",
             "prompt_len": 5, "new_tokens": tokens, "latency_s": lat,
             "tokens_per_s": bs * tokens / lat, "ttft_s": None, "decode_step_ms": 1.0,
             "tflops": 0.1, "warmup_s": latencies[0], "compile_s": latencies[0] - latencies[-1]}
            for i, lat in enumerate(latencies)]


def test_summary_medians_and_ratio():
    rows = rows_for("jax/x", 1, [5.0, 1.0, 2.0, 3.0]) + rows_for("facebook/x", 1, [9, 4, 4, 4])
    s = {r["model"]: r for r in summarize(rows)}
    assert s["jax/x"]["latency_s"] == 2.0 and s["jax/x"]["batches"] == 3
    assert s["jax/x"]["vs_baseline"] == pytest.approx(2.0)  # facebook/ is the baseline
    assert s["facebook/x"]["vs_baseline"] == 1.0
    # HF torch runs eagerly: no compile time, whatever its rows recorded
    assert s["jax/x"]["compile_s"] == 2.0 and s["facebook/x"]["compile_s"] is None
    md = summary_markdown([{**r, **ENV} for r in rows])
    assert [line.endswith("| n/a | 1.00 |") for line in md.splitlines()
            if line.startswith("| jax/x") or line.startswith("| facebook/x")] == [False, True]


def test_generation_is_prefill_plus_decode_steps():
    """One FLOP model: a generation is its prefill plus one decode step per later token."""
    cfg = OPTConfig.from_name("opt-350m")  # with projections
    steps = sum(decode_step_cost(cfg, 3, 7 + i, 2)[0] for i in range(1, 5))
    assert generation_flops(cfg, 3, 7, 5) == pytest.approx(prefill_flops(cfg, 3, 7) + steps)
    assert generation_flops(cfg, 3, 7, 0) == 0.0


def test_default_output_is_under_build():
    from optkit.cli import build_parser

    args = build_parser().parse_args(["bench", "textgen"])
    assert args.output.startswith("build/")


def test_cli_runs_backends_side_by_side(tmp_path, capsys):
    import numpy as np

    from optkit.config import OPTConfig
    from optkit.weights.random import write_random_folder

    # one weight folder for both backends (loading it is quicker than random init on device)
    write_random_folder(tmp_path / "opt-tiny-np", OPTConfig.from_name("opt-tiny"),
                        dtype=np.float32, progress=False)
    out, summary = tmp_path / "tg.jsonl", tmp_path / "tg.md"
    assert main(["bench", "textgen", "--model", "facebook/opt-tiny", "jax/opt-tiny",
                 "--path", str(tmp_path), "--batch-size", "2", "--max-new-tokens", "4",
                 "--num-batches", "2", "--output", str(out), "--summary", str(summary),
                 "--debug"]) == 0
    printed = capsys.readouterr().out
    assert "jax/opt-tiny bs=2" in printed and "TFLOPS=" in printed
    # --debug shows the text; the same weights give the same greedy text on both backends
    texts = [line for line in printed.splitlines() if line.startswith("  'Paris is")]
    assert len(texts) == 2 and len(set(texts)) == 1  # the first batch of each backend
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3 and {r["phase"] for r in rows} == {"warmup", "measure"}
    jax_rows = [r for r in rows if r["model"] == "jax/opt-tiny"]
    assert all(r["new_tokens"] == 4 and r["batch_size"] == 2 for r in rows)
    assert all(r["decode_step_ms"] > 0 and r["ttft_s"] > 0 for r in jax_rows)
    assert all(r["compile_s"] is not None for r in jax_rows)
    assert all(r["compile_s"] is None for r in rows if r["backend"] == "facebook")
    assert all(r["jax"] and r["transformers"] for r in rows)
    assert "optkit bench textgen --model facebook/opt-tiny jax/opt-tiny" in rows[0]["command"]
    md = summary.read_text()
    assert "vs facebook/opt-tiny" in md and "| jax/opt-tiny | 2 |" in md


def test_bench_without_subcommand_prints_help(capsys):
    assert main(["bench"]) == 2
    assert "textgen" in capsys.readouterr().out


ENV = {"cpu": "cpu", "cpu_count": 2, "jax_device": "cpu:cpu", "torch_device": "cpu",
       "python": "3", "jax": "j", "torch": "t", "transformers": "tr", "optkit": "o",
       "timestamp": "now", "dtype": "float32",
       "config": {"num_beams": 1, "do_sample": False, "ignore_eos": True, "warmup": 1}}


def test_summary_markdown_mentions_command():
    rows = [{**r, **ENV} for r in rows_for("jax/x", 1, [5.0, 1.0])]
    assert "Command: `optkit bench textgen x`" in summary_markdown(rows, "optkit bench textgen x")
