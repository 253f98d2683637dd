"""Serving: a continuous-batching engine behind an OpenAI-compatible HTTP API and a web page.

Layers (each file one job)::

    engine.py     the step contract; PagedEngine (paged KV cache), ModelEngine (slots)
    blocks.py     KV-cache blocks: allocation, reference counts, the prefix cache
    fake.py       a hand-checkable engine without a model (tests, UI work)
    queue.py      waiting requests, weighted by API key
    scheduler.py  the engine thread: token budget, chunked prefill, preemption, stop
                  strings, cancellation
    text.py       tokenizer codecs and log-prob entries (detokenizing: optkit.generation)
    protocol.py   OpenAI / vLLM request and response models, APIError
    chat.py       chat templates: messages -> one prompt + stop strings
    requests.py   request validation and expansion into sequences; /tokenize, /detokenize
    responses.py  completion and chat response bodies and chunks
    streaming.py  submit, the non-streaming collector, the SSE stream
    keys.py       the API-key file, constant-time key checks
    guard.py      ASGI middleware: Host allow-list, API keys, body limit (before the body)
    app.py        thin FastAPI routes;  metrics.py  Prometheus;  static/  the page, the icon
    server.py     uvicorn in the foreground or on a thread

``serve_app(model)`` builds the whole stack for a ``get_model`` result::

    app = serve_app(get_model("jax/opt-125m", dummy=True))
    with BackgroundServer(app) as srv:   # or optkit.serve.server.run(app)
        print(srv.url)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from optkit.serve.app import create_app
from optkit.serve.engine import (
    Engine,
    EngineRequest,
    ModelEngine,
    PagedEngine,
    SamplingParams,
    make_engine,
)
from optkit.serve.fake import FakeEngine
from optkit.serve.guard import MAX_BODY_BYTES
from optkit.serve.keys import read_api_keys
from optkit.serve.metrics import Metrics
from optkit.serve.scheduler import Limits, Scheduler, SeqRequest
from optkit.serve.server import BackgroundServer, run
from optkit.serve.text import CharCodec, HFCodec


def serve_app(model, tokenizer=None, *, name: str | None = None,
              max_num_seqs: int | None = None, max_batched_tokens: int | None = None,
              block_size: int = 16, num_blocks: int | None = None,
              memory_fraction: float = 0.9, max_len: int | None = None,
              limits: Limits | None = None, api_keys: Mapping[str, float] | None = None,
              steps_per_dispatch: int = 8, max_logprobs: int = 5, max_n: int = 16,
              prefix_caching: bool = True, warmup: bool = True,
              max_body_bytes: int = MAX_BODY_BYTES, allowed_hosts: Sequence[str] | None = None):
    """A FastAPI app serving a JAX model from :func:`optkit.get_model` (anything with an
    ``.executor``); ``tokenizer`` defaults to optkit's.  The engine is a
    :class:`~optkit.serve.engine.PagedEngine` (sizing: see there; defaults by platform) or,
    for pipeline / Ray executors, a :class:`~optkit.serve.engine.ModelEngine` with
    ``max_num_seqs`` slots.  ``api_keys``, ``max_body_bytes``, ``allowed_hosts``: see
    :class:`~optkit.serve.guard.Guard`."""
    if not hasattr(model, "executor"):
        raise ValueError(f"serving needs a JAX model (jax/... or alpa/...); got {model!r}")
    if tokenizer is None:
        from optkit import get_tokenizer

        tokenizer = get_tokenizer()
    paged = dict(max_batched_tokens=max_batched_tokens, block_size=block_size,
                 num_blocks=num_blocks, memory_fraction=memory_fraction,
                 prefix_caching=prefix_caching)
    engine = make_engine(model.executor, max_num_seqs=max_num_seqs, max_len=max_len,
                         max_logprobs=max_logprobs, **paged)
    if warmup:
        engine.warmup(steps=(1, steps_per_dispatch))
    name = name or getattr(model, "name", "") or model.config.name
    scheduler = Scheduler(engine, HFCodec(tokenizer), limits or Limits(), weights=api_keys,
                          steps_per_dispatch=steps_per_dispatch, metrics=Metrics(),
                          prefix_caching=prefix_caching)
    aliases = (name.split("/", 1)[1],) if "/" in name else ()
    return create_app(scheduler, scheduler.codec, name, api_keys=api_keys, max_n=max_n,
                      aliases=aliases, max_body_bytes=max_body_bytes,
                      allowed_hosts=allowed_hosts)


__all__ = ["BackgroundServer", "CharCodec", "Engine", "EngineRequest", "FakeEngine",
           "HFCodec", "Limits", "Metrics", "ModelEngine", "PagedEngine", "SamplingParams",
           "Scheduler", "SeqRequest", "create_app", "make_engine", "read_api_keys", "run",
           "serve_app"]
