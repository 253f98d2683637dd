"""``optkit generate`` prints every completion the same way, whatever the backend, the number
of prompts or the search: the prompt and its continuation, ``[stop]`` or ``[length]`` on a
line of its own, and a blank line between completions."""

import re

import pytest

from optkit.cli import main

BLOCK = re.compile(r"(?P<text>.*?)\n\[(?P<reason>stop|length)\]\n", re.S)


def completions(out: str, prompts: list[str]) -> list[tuple[str, str]]:
    """Split ``out`` into (continuation, reason) per prompt, checking the layout exactly."""
    rows, pos = [], 0
    for i, prompt in enumerate(prompts):
        if i:
            assert out[pos] == "\n", out
            pos += 1
        m = BLOCK.match(out, pos)
        assert m and m["text"].startswith(prompt), out
        rows.append((m["text"][len(prompt):], m["reason"]))
        pos = m.end()
    assert pos == len(out), out
    return rows


@pytest.mark.parametrize("model,extra,n", [
    ("jax/opt-tiny", [], 1),                        # streamed
    ("jax/opt-tiny", [], 2),
    ("jax/opt-tiny", ["--num-beams", "2"], 1),
    ("facebook/opt-tiny", [], 1),
    ("facebook/opt-tiny", ["--num-beams", "2"], 2),
])
def test_one_format(capsys, model, extra, n):
    prompts = ["Hello there", "The capital of France is"][:n]
    args = ["generate", "--model", model, "--dummy", "--max-new-tokens", "3", *extra]
    for p in prompts:
        args += ["--prompt", p]
    assert main(args) == 0
    rows = completions(capsys.readouterr().out, prompts)
    assert len(rows) == n and all(text for text, _ in rows)
