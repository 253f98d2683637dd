"""Serving: a continuous-batching engine behind an OpenAI-compatible HTTP API and a web page.

Layers (each file one job)::

    engine.py     the prefill / insert / generate contract; ModelEngine over any executor
    fake.py       a hand-checkable engine without a model (tests, UI work)
    queue.py      waiting requests, weighted by API key
    scheduler.py  the engine thread: admission, slots, stop strings, cancellation
    text.py       tokenizer codecs and log-prob entries (detokenizing: optkit.generation)
    protocol.py   OpenAI / vLLM request and response models, APIError
    chat.py       chat templates: messages -> one prompt + stop strings
    requests.py   request validation and expansion into sequences; /tokenize, /detokenize
    responses.py  completion and chat response bodies and chunks
    streaming.py  submit, the non-streaming collector, the SSE stream
    app.py        thin FastAPI routes;  metrics.py  Prometheus;  static/  the page, the icon
    server.py     uvicorn in the foreground or on a thread

``serve_app(model)`` builds the whole stack for a ``get_model`` result::

    app = serve_app(get_model("jax/opt-125m", dummy=True))
    with BackgroundServer(app) as srv:   # or optkit.serve.server.run(app)
        print(srv.url)
"""

from __future__ import annotations

from collections.abc import Mapping

from optkit.serve.app import create_app, read_api_keys
from optkit.serve.engine import Engine, EngineRequest, ModelEngine, SamplingParams
from optkit.serve.fake import FakeEngine
from optkit.serve.metrics import Metrics
from optkit.serve.scheduler import Limits, Scheduler, SeqRequest
from optkit.serve.server import BackgroundServer, run
from optkit.serve.text import CharCodec, HFCodec


def serve_app(model, tokenizer=None, *, name: str | None = None, max_slots: int = 16,
              max_len: int | None = None, limits: Limits | None = None,
              api_keys: Mapping[str, float] | None = None, steps_per_dispatch: int = 4,
              max_logprobs: int = 5, max_n: int = 16, warmup: bool = True):
    """A FastAPI app serving a JAX model from :func:`optkit.get_model` (anything with an
    ``.executor``); ``tokenizer`` defaults to optkit's."""
    if not hasattr(model, "executor"):
        raise ValueError(f"serving needs a JAX model (jax/... or alpa/...); got {model!r}")
    if tokenizer is None:
        from optkit import get_tokenizer

        tokenizer = get_tokenizer()
    engine = ModelEngine(model.executor, max_slots=max_slots, max_len=max_len,
                         max_logprobs=max_logprobs)
    if warmup:
        engine.warmup(steps=(1, steps_per_dispatch))
    name = name or getattr(model, "name", "") or model.config.name
    scheduler = Scheduler(engine, HFCodec(tokenizer), limits or Limits(), weights=api_keys,
                          steps_per_dispatch=steps_per_dispatch, metrics=Metrics())
    aliases = (name.split("/", 1)[1],) if "/" in name else ()
    return create_app(scheduler, scheduler.codec, name, api_keys=api_keys, max_n=max_n,
                      aliases=aliases)


__all__ = ["BackgroundServer", "CharCodec", "Engine", "EngineRequest", "FakeEngine",
           "HFCodec", "Limits", "Metrics", "ModelEngine", "SamplingParams", "Scheduler",
           "SeqRequest", "create_app", "read_api_keys", "run", "serve_app"]
