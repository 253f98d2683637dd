"""The generation panel (optkit.notebook): widgets set, buttons clicked, output captured."""

import threading

import pytest

from optkit.generation import generate_text
from optkit.notebook import generation_ui


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    from optkit import get_model

    return get_model("jax/opt-tiny", path=tiny_weights, progress=False)


PROMPT, N = "The capital of France is", 200
#: seconds a generation may take before ``wait`` calls it hung (minutes: a busy machine)
WAIT = 300


@pytest.fixture(scope="module")
def greedy(tiny):
    """The greedy continuation, with the panel's steps per dispatch (the same programs)."""
    (c,) = generate_text(tiny, None, [PROMPT], max_new_tokens=N, steps_per_dispatch=4)
    return c


def test_generate_streams_into_the_output(tiny, greedy):
    ui = generation_ui(tiny)
    ui.prompt.value = PROMPT
    ui.temperature.value = 0.0  # greedy
    ui.max_tokens.value = N
    assert "do_sample" not in ui.generate_kwargs()
    ui.generate_button.click()
    assert ui.generate_button.disabled and not ui.stop_button.disabled
    ui.wait(WAIT)
    assert ui.completion.tokens == greedy.tokens and ui.text == greedy.text
    assert ui.output_text == PROMPT + greedy.text
    assert len(ui.output.outputs) > 10  # streamed in pieces, not at the end
    assert ui.status.value.startswith(f"{N} tokens in") and "finish: length" in ui.status.value
    assert not ui.generate_button.disabled and ui.stop_button.disabled
    bundle = ui._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_stop_button_ends_generation_early(tiny, greedy, monkeypatch):
    ui = generation_ui(tiny, prompt=PROMPT, temperature=0.0, max_new_tokens=N)
    # The generation thread waits after its first streamed piece until Stop is clicked, so
    # the click lands mid-generation however the threads are scheduled.
    streamed, clicked = threading.Event(), threading.Event()
    on_text = ui._on_text

    def gated(row, delta):
        on_text(row, delta)
        streamed.set()
        assert clicked.wait(WAIT)

    monkeypatch.setattr(ui, "_on_text", gated)
    ui.generate_button.click()
    assert streamed.wait(WAIT) and ui.text
    ui.generate_button.click()  # a second click while running is ignored
    ui.stop_button.click()
    clicked.set()
    ui.wait(WAIT)
    assert ui.stopped and ui.completion is None and ui.error is None
    assert ui.status.value.startswith("stopped after")
    assert greedy.text.startswith(ui.text) and len(ui.text) < len(greedy.text)
    assert ui.output_text == PROMPT + ui.text
    assert not ui.generate_button.disabled
    ui.generate_button.click()  # and it can run again
    ui.stop_button.click()
    ui.wait(WAIT)
    assert ui.stopped


def test_sampling_sliders(tiny):
    ui = generation_ui(tiny, prompt=PROMPT, max_new_tokens=8)
    ui.temperature.value, ui.top_p.value, ui.top_k.value = 0.8, 0.9, 20
    kw = ui.generate_kwargs()
    assert kw["do_sample"] and kw["temperature"] == 0.8 and kw["top_k"] == 20
    ui.generate_button.click()
    ui.wait(WAIT)
    (want,) = generate_text(tiny, None, [PROMPT], **kw)
    assert ui.completion.tokens == want.tokens and len(want.tokens) == 8


def test_errors_show_in_the_panel(tiny):
    ui = generation_ui(tiny, prompt="word " * 250, temperature=0.0, max_new_tokens=100)
    ui.generate_button.click()
    ui.wait(WAIT)
    assert ui.error and ui.status.value == "error"
    assert ui.error in ui.output_text
    with pytest.raises(TypeError, match="JAX model"):
        generation_ui(object())
