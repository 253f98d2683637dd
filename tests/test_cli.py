import subprocess
import sys

import pytest

from optkit.cli import build_parser, main
from tests.conftest import CONFIGS


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_random_weights_then_generate(tmp_path):
    cfg = CONFIGS["pre_ln"].replace(vocab_size=50272)
    cfg.save_json(tmp_path / "c.json")
    assert main(["random-weights", str(tmp_path / "opt-x-np"), "--model",
                 str(tmp_path / "c.json")]) == 0
    base = [sys.executable, "-m", "optkit.cli", "generate", "--model", "jax/opt-x",
            "--path", str(tmp_path), "--max-new-tokens", "4"]
    out = subprocess.run(base + ["--prompt", "Hello"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.startswith("Hello") and out.stdout.rstrip().endswith("[length]")
    out = subprocess.run(base + ["--prompt", "Hi", "--prompt", "Yo", "--do-sample",
                                 "--top-p", "0.9"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("Hi") and "\n\nYo" in out.stdout
    out = subprocess.run(base + ["--prompt", "Hello", "--quantize", "int8"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("Hello") and "[length]" in out.stdout
    # the Pallas kernels (interpreted on CPU) generate what XLA's path does
    greedy = [subprocess.run(base + ["--prompt", "Hello", "--quantize", "int8", "--kernels", a],
                             capture_output=True, text=True, check=True).stdout
              for a in ("xla", "pallas")]
    assert greedy[0] == greedy[1] and greedy[0].startswith("Hello")


def test_generate_rejects_bad_settings_before_loading(monkeypatch, capsys):
    import logging

    import optkit.commands.generate as gen

    monkeypatch.setattr(gen, "load_model", lambda args: pytest.fail("loaded a model"))
    for extra, msg in ((["--max-new-tokens", "-3"], "max_new_tokens must be >= 1"),
                       (["--max-new-tokens", "2047"], "(3 tokens) + 2047 new tokens exceed"),
                       (["--do-sample", "--top-p", "3"], "top_p must lie in (0, 1]")):
        assert main(["generate", "--model", "jax/opt-125m", "--dummy",
                     "--prompt", "hi there", *extra]) == 1
        captured = capsys.readouterr()
        assert msg in captured.err and captured.out == ""
    # without -v, JAX's and httpx's INFO lines stay out of the output
    assert all(logging.getLogger(n).getEffectiveLevel() == logging.WARNING
               for n in ("jax", "httpx"))


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "convert" in capsys.readouterr().out


def test_loading_options_are_checked_where_they_enter(capsys):
    """--dtype and --kernels are checked while parsing (optkit.options); a combination that
    cannot load (the int8 product kernel without --quantize int8) fails before loading."""
    import argparse

    from optkit.commands.loading import add_loading_options
    from optkit.options import KERNEL_CHOICES

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_loading_options(parser)
    for choice in (*KERNEL_CHOICES, "attention", "matvec,attention"):
        assert parser.parse_args(["--kernels", choice]).kernels == choice
    args = parser.parse_args([])
    assert (args.kernels, args.dtype, args.quantize) == ("auto", "auto", None)
    assert parser.parse_args(["--dtype", "bf16"]).dtype == "bfloat16"
    for bad in ("flash", "norm", "attention,norm", ""):
        with pytest.raises(argparse.ArgumentError, match="names joined by commas"):
            parser.parse_args(["--kernels", bad])
    with pytest.raises(argparse.ArgumentError, match="unknown dtype"):
        parser.parse_args(["--dtype", "fp8"])
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parser.parse_args(["--quantize", "int4"])
    assert main(["generate", "--model", "jax/opt-tiny", "--dummy", "--prompt", "hi",
                 "--kernels", "matvec"]) == 1
    assert "the model is not int8" in capsys.readouterr().err




@pytest.mark.parametrize("command", ["generate", "serve"])
def test_checksums_name_a_corrupt_weight_file(tmp_path, capsys, command):
    """A flipped byte keeps the file's size and header: it loads unless --checksums."""
    import numpy as np

    from optkit.config import OPTConfig
    from optkit.weights.random import write_random_folder

    folder = write_random_folder(tmp_path / "opt-tiny-np", OPTConfig.from_name("opt-tiny"),
                                 dtype=np.float32, progress=False)
    victim = folder / "decoder.layers.0.fc1.weight"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    argv = [command, "--model", "jax/opt-tiny", "--path", str(tmp_path)]
    if command == "generate":
        argv += ["--prompt", "hi", "--max-new-tokens", "1"]
        assert main(argv) == 0
        capsys.readouterr()
    assert main([*argv, "--checksums"]) == 1  # serve: fails before it listens
    err = capsys.readouterr().err
    assert f"optkit {command}: error: corrupt weight file {victim}: sha256" in err
