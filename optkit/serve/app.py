"""The HTTP server: thin routes over the request planner, the collector and the SSE stream.

``create_app(scheduler, codec, model_name)`` returns a FastAPI app: OpenAI-compatible
``/v1/completions`` and ``/v1/chat/completions`` (chat messages rendered by a plain-text
template, :mod:`optkit.serve.chat`), vLLM's ``/tokenize`` and ``/detokenize``, ``/v1/models``,
``/health``, Prometheus ``/metrics`` and the web page.  A completion route is three calls:
:class:`~optkit.serve.requests.RequestPlanner` validates and expands the body,
:func:`~optkit.serve.streaming.submit` queues the sequences, and
:func:`~optkit.serve.streaming.collect` or :func:`~optkit.serve.streaming.sse` answers in
the API's format (:mod:`optkit.serve.responses`).  The scheduler's engine thread does all
model work (see :mod:`optkit.serve.scheduler`), so no endpoint blocks the event loop.  Every
error is an OpenAI error object ``{"error": {message, type, param, code}}``.  (No ``from
__future__ import annotations`` here: FastAPI reads the endpoints' annotations, which refer
to names local to :func:`create_app`.)
"""

import logging
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from optkit.serve.chat import get_template
from optkit.serve.guard import MAX_BODY_BYTES, Guard, accepted_key, protected_paths
from optkit.serve.metrics import Metrics
from optkit.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from optkit.serve.requests import RequestPlanner
from optkit.serve.responses import ChatFormat, CompletionFormat
from optkit.serve.scheduler import Scheduler
from optkit.serve.streaming import collect, sse, submit
from optkit.serve.text import Codec

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: rejected-request counter label per status of an APIError
REJECTED = {400: "invalid", 401: "auth", 429: "queue_full"}


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error as an OpenAI error object; refusals counted in ``metrics``."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        if exc.status in REJECTED:
            metrics.rejected.labels(REJECTED[exc.status]).inc()
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [x for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip()
            param = None
        else:  # the top-level field (deeper parts name union members, not fields)
            param = str(loc[0]) if loc and isinstance(loc[0], str) else None
            text = str(err.get("msg")).removeprefix("Value error, ")
            msg = f"{param}: {text}" if param else text
        metrics.rejected.labels("invalid").inc()
        return JSONResponse(error_body(msg, param=param, code=err.get("type")), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        typ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), typ, code=exc.status_code),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"),
                            status_code=500)


def create_app(scheduler: Scheduler, codec: Codec, model_name: str, *,
               api_keys: Mapping[str, float] | None = None, max_n: int = 16,
               metrics: Metrics | None = None, aliases: tuple[str, ...] = (),
               chat_template: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """FastAPI app serving ``scheduler`` (started and stopped with the app).
    ``chat_template``: ``plain`` or ``instruct`` (default: by ``model_name``).
    ``api_keys``, ``max_body_bytes``, ``allowed_hosts``: see :class:`~optkit.serve.guard.Guard`."""
    metrics = metrics or scheduler.metrics or Metrics()
    if scheduler.metrics is None:
        scheduler.metrics = metrics
    metrics.bind(scheduler)
    engine = scheduler.engine
    planner = RequestPlanner(scheduler, codec, model_name, aliases, max_n,
                             get_template(chat_template, model_name))
    page = (STATIC / "index.html").read_text()
    icon = (STATIC / "favicon.ico").read_bytes()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="optkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over a "
                              "continuous-batching engine")
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.planner = planner

    add_error_handlers(app, metrics)
    Key = Annotated[str | None, Depends(accepted_key)]

    # Plain endpoints ----------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(icon, media_type="image/x-icon",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/health")
    async def health():
        s = scheduler.stats()
        status = 200 if s["alive"] else 503
        return JSONResponse({"status": "ok" if s["alive"] else "engine stopped",
                             "model": model_name, **s}, status_code=status)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(key: Key):
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "optkit",
            "max_model_len": engine.max_len, "max_slots": engine.max_slots,
            "max_logprobs": engine.max_logprobs, "requires_key": bool(api_keys),
            "chat_template": planner.template.name}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, key: Key):
        return planner.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, key: Key):
        return planner.detokenize(body)

    # Generation ---------------------------------------------------------------------------
    async def answer(plan, fmt, stream: bool, request: Request, key: str | None):
        sub = submit(scheduler, plan, key)
        if stream:
            return StreamingResponse(sse(sub, plan, fmt), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return fmt.response(await collect(sub, plan, request.receive))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: Key):
        plan = planner.completion(body)  # tokenizing is fast: no thread hop
        return await answer(plan, CompletionFormat(model_name, plan), bool(body.stream),
                            request, key)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: Key):
        plan = planner.chat(body)
        return await answer(plan, ChatFormat(model_name, plan), bool(body.stream), request,
                            key)

    app.add_middleware(Guard(None, keys=api_keys, protected=protected_paths(app.routes),
                             max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts,
                             metrics=metrics).around)
    return app
