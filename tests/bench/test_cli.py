"""``optkit bench sweep`` and ``optkit bench report`` from the command line."""

import pytest

from optkit.bench.results import read_rows
from optkit.cli import main
from optkit.commands.bench import parse_baseline


def test_parse_baseline():
    assert parse_baseline(None) is None and parse_baseline("first") is None
    assert parse_baseline("none") is False and parse_baseline("2") == 2
    assert parse_baseline("backend=facebook,batch_size=1") == {"backend": "facebook",
                                                                "batch_size": 1}
    with pytest.raises(ValueError, match="field=value"):
        parse_baseline("facebook")


def test_sweep_cli_against_hf(tiny_path, tmp_path, capsys):
    csv, jsonl, plots = tmp_path / "s.csv", tmp_path / "s.jsonl", tmp_path / "plots"
    argv = ["bench", "sweep", "--model", "opt-tiny", "--path", tiny_path, "--batch-size", "1",
            "2", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--baseline",
            "backend=facebook", "--output", str(csv), str(jsonl), "--plots", str(plots)]
    assert main(argv) == 0
    df = read_rows(csv)
    assert sorted(zip(df["backend"], df["batch_size"], strict=True)) == [
        ("facebook", 1), ("facebook", 2), ("jax", 1), ("jax", 2)]
    jax = df[df["backend"] == "jax"].set_index("batch_size")
    fb = df[df["backend"] == "facebook"].set_index("batch_size")
    assert jax["speedup"].to_dict() == pytest.approx(
        (jax["tokens_per_s"] / fb["tokens_per_s"]).to_dict())
    assert len(read_rows(jsonl)) == 4
    assert {p.name for p in plots.iterdir()} == {"throughput.png", "roofline.png",
                                                 "speedup.png"}
    out = capsys.readouterr().out
    assert "speedup" in out and "resolved_dtype" in out and "float32" in out  # not "auto"
    assert main(argv) == 0  # resumed: nothing measured again
    assert len(read_rows(csv)) == 4


def test_sweep_cli_from_yaml(tiny_path, tmp_path):
    sweep = tmp_path / "s.yaml"
    out = tmp_path / "y.jsonl"
    sweep.write_text(f"output: {out}\nbase: {{model: opt-tiny, path: {tiny_path}, "
                     "prompt_len: 4, new_tokens: 2, repeats: 1}\n"
                     "grid: {steps_per_dispatch: [1, 2]}\nbaseline: 0\n")
    assert main(["bench", "sweep", "--sweep", str(sweep)]) == 0
    df = read_rows(out)
    assert list(df["steps_per_dispatch"]) == [1, 2] and df["speedup"][0] == 1.0


def test_report_cli_lists_and_checks_parameters(capsys):
    assert main(["bench", "report", "--notebook", "05_serving_load", "--list-parameters"]) == 0
    out = capsys.readouterr().out
    assert 'rates: list = [1, 2, 4, 8]  # offered request rates' in out
    assert main(["bench", "report", "-p", "modle", "opt-tiny"]) == 1
    assert "has no parameters ['modle']" in capsys.readouterr().err
    assert main(["bench", "report", "--notebook", "nope"]) == 1
