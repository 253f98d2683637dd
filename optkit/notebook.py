"""Notebook helpers: an interactive generation panel (ipywidgets) built around any JAX model.

``generation_ui(model)`` returns a :class:`GenerationUI`; show it as a cell's value.  It has a
prompt box, sliders for temperature (0 = greedy), top-p, top-k (0 = off) and the number of
new tokens, an optional stop string, Generate and Stop buttons, and an output area into
which text streams as it is generated (:func:`optkit.generation.generate_text`'s
``on_text``).  Generation runs on a background thread, so the kernel stays free to receive
the Stop click; Stop takes effect at the next streamed piece of text.  Notebooks only call
this (they define no functions); tests drive it by setting widget values and calling
``.click()``.
"""

from __future__ import annotations

import threading
import time


class Stopped(Exception):
    """Raised from the streaming callback to end a generation early."""


class GenerationUI:
    """Widgets plus their callbacks; ``widget`` is the whole panel (see the module doc)."""

    def __init__(self, model, tokenizer=None, prompt: str = "Paris is the capital city of",
                 max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.9,
                 top_k: int = 0, stop: str = "", seed: int = 0, steps_per_dispatch: int = 4):
        import ipywidgets as w

        from optkit.weights.tokenizer import get_tokenizer

        if not hasattr(model, "executor"):
            raise TypeError(f"the generation panel needs a JAX model (jax/ or alpa/); got "
                            f"{type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
        self.seed = seed
        self.steps_per_dispatch = steps_per_dispatch
        limit = model.config.max_position_embeddings
        wide = w.Layout(width="98%")
        style = {"description_width": "110px"}
        self.prompt = w.Textarea(value=prompt, description="Prompt", layout=w.Layout(
            width="98%", height="80px"), style=style)
        self.temperature = w.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05,
                                         description="temperature", style=style, layout=wide)
        self.top_p = w.FloatSlider(value=top_p, min=0.05, max=1.0, step=0.05,
                                   description="top-p", style=style, layout=wide)
        self.top_k = w.IntSlider(value=top_k, min=0, max=200, description="top-k (0: off)",
                                 style=style, layout=wide)
        self.max_tokens = w.IntSlider(value=max_new_tokens, min=1, max=min(1024, limit - 1),
                                      description="new tokens", style=style, layout=wide)
        self.stop_text = w.Text(value=stop, description="stop string", style=style,
                                placeholder="(none)")
        self.generate_button = w.Button(description="Generate", button_style="primary",
                                        icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop",
                                    disabled=True)
        self.status = w.Label(value="")
        self.output = w.Output(layout=w.Layout(border="1px solid #ccc", padding="4px",
                                               min_height="60px", width="98%"))
        self.widget = w.VBox([
            self.prompt, self.temperature, self.top_p, self.top_k, self.max_tokens,
            self.stop_text, w.HBox([self.generate_button, self.stop_button, self.status]),
            self.output])
        self.generate_button.on_click(self._on_generate)
        self.stop_button.on_click(self._on_stop)
        self.text = ""            # the continuation streamed so far
        self.completion = None    # the last finished Completion (None if stopped)
        self.stopped = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Display -------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # Settings ------------------------------------------------------------------------------
    def generate_kwargs(self) -> dict:
        """``generate`` arguments from the widgets (temperature 0 means greedy)."""
        kw = {"max_new_tokens": int(self.max_tokens.value),
              "steps_per_dispatch": self.steps_per_dispatch}
        if self.temperature.value > 0:
            kw.update(do_sample=True, temperature=float(self.temperature.value),
                      top_p=float(self.top_p.value), top_k=int(self.top_k.value),
                      seed=self.seed)
        return kw

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # Callbacks -----------------------------------------------------------------------------
    def _on_generate(self, _button=None) -> None:
        if self.running:
            return
        self._stop.clear()
        self.text, self.completion, self.stopped, self.error = "", None, False, None
        self.output.clear_output()
        self.output.append_stdout(self.prompt.value)
        self.generate_button.disabled = True
        self.stop_button.disabled = False
        self.status.value = "generating…"
        args = (self.prompt.value, self.stop_text.value or None, self.generate_kwargs())
        self._thread = threading.Thread(target=self._run, args=args, daemon=True,
                                        name="optkit-generation-ui")
        self._thread.start()

    def _on_stop(self, _button=None) -> None:
        self._stop.set()
        self.status.value = "stopping…"

    def _on_text(self, row: int, delta: str) -> None:
        if self._stop.is_set():
            raise Stopped
        self.text += delta
        self.output.append_stdout(delta)

    def _run(self, prompt: str, stop: str | None, kwargs: dict) -> None:
        from optkit.generation import generate_text

        start = time.perf_counter()
        try:
            (c,) = generate_text(self.model, self.tokenizer, [prompt], stop=stop,
                                 on_text=self._on_text, **kwargs)
            self.completion = c
            dt = time.perf_counter() - start
            self.status.value = (f"{len(c.tokens)} tokens in {dt:.2f} s "
                                 f"({len(c.tokens) / dt:.1f} tokens/s), finish: "
                                 f"{c.finish_reason}")
        except Stopped:
            self.stopped = True
            self.status.value = f"stopped after {len(self.text)} characters"
        except Exception as e:  # shown in the panel; the kernel goes on
            self.error = f"{type(e).__name__}: {e}"
            self.status.value = "error"
            self.output.append_stderr("\n" + self.error)
        finally:
            self.generate_button.disabled = False
            self.stop_button.disabled = True

    def wait(self, timeout: float | None = None) -> GenerationUI:
        """Block until the current generation ends (headless runs, tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("generation still running")
        return self

    @property
    def output_text(self) -> str:
        """Everything the output area shows (prompt, then the streamed continuation)."""
        return "".join(o.get("text", "") for o in self.output.outputs)


def generation_ui(model, tokenizer=None, **defaults) -> GenerationUI:
    """The interactive generation panel for ``model`` (see :class:`GenerationUI` for the
    starting values: prompt, max_new_tokens, temperature, top_p, top_k, stop, seed)."""
    return GenerationUI(model, tokenizer, **defaults)
