"""``optkit serve``: help, argument wiring, API-key files, and a clean Ctrl-C shutdown."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from optkit.cli import build_parser, main
from optkit.commands.serve import build_app
from optkit.serve import PagedEngine, read_api_keys


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--path", "--port", "--host", "--dummy", "--max-num-seqs",
                 "--max-batched-tokens", "--block-size", "--num-blocks", "--kv-memory-fraction",
                 "--max-prompt-len", "--max-queue", "--api-keys", "--tokenizer",
                 "--shutdown-timeout", "--checksums"):
        assert flag in out


def test_arguments_build_the_server(tmp_path):
    from optkit.config import OPTConfig
    from optkit.weights.random import write_random_folder

    write_random_folder(tmp_path / "opt-tiny-np", OPTConfig.from_name("opt-tiny"),
                        dtype=np.float32, progress=False)
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha 3\nbeta\n")
    args = build_parser().parse_args([
        "serve", "--model", "jax/opt-tiny", "--path", str(tmp_path), "--max-num-seqs", "3",
        "--max-len", "64", "--max-batched-tokens", "32", "--block-size", "8", "--num-blocks",
        "20", "--max-queue", "5", "--max-prompt-len", "40", "--api-keys",
        str(keys), "--no-warmup"])
    app = build_app(args)
    s = app.state.scheduler
    assert isinstance(s.engine, PagedEngine)
    e = s.engine
    assert (e.max_num_seqs, e.max_len, e.max_batched_tokens, e.block_size, e.num_blocks,
            s.limits.max_queue, s.max_prompt_len) == (3, 64, 32, 8, 20, 5, 40)
    assert s._queue.weights == {"alpha": 3.0, "beta": 1.0}


@pytest.mark.parametrize("argv, message", [
    (["--model", "facebook/opt-125m", "--dummy"], "JAX"),
    (["--model", "jax/opt-125m"], "--path"),
    (["--model", "jax/opt-125m", "--dummy", "--checksums"], "--checksums verifies"),
    (["--fake", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
])
def test_argument_errors(argv, message, capsys):
    assert main(["serve", *argv]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("", "no API keys"), ("a 1 2\n", r"KEY \[WEIGHT\]"), ("a x\n", "not a number"),
    ("a 0\n", "positive")])
def test_bad_key_files(tmp_path, text, message):
    f = tmp_path / "keys"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_api_keys(f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_then_drains_on_ctrl_c():
    """Ctrl-C: the open stream (2000 tokens at 0.02 s a step: 40 s at least) outlives the
    1 s grace period, so it ends with an error event and [DONE]; the process exits 0."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "optkit.cli", "serve", "--fake", "--port",
                             str(port), "--shutdown-timeout", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", timeout=300,
                       json={"model": "fake", "prompt": "Hi", "max_tokens": 3})
        assert r.json()["choices"][0]["text"] == "jkl"
        with httpx.stream("POST", url + "/v1/completions", timeout=300, json={
                "model": "fake", "prompt": "a", "max_tokens": 2000, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)  # a stream is open while we press Ctrl-C
            proc.send_signal(signal.SIGINT)
            events = [first] + [line for line in lines if line]
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"] == "the server is shutting down", error
    assert all('"text_completion"' in e for e in events[:-2])
    assert code == 0, out
    assert "ending 1 unfinished sequence(s) with an error" in out
    assert "Application shutdown complete" in out and "Traceback" not in out
    assert f"http://127.0.0.1:{port}/" in out
