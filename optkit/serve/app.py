"""The HTTP server: thin routes over the request planner, the collector and the SSE stream.

``create_app(scheduler, codec, model_name)`` returns a FastAPI app: OpenAI-compatible
``/v1/completions`` and ``/v1/chat/completions`` (chat messages rendered by a plain-text
template, :mod:`optkit.serve.chat`), vLLM's ``/tokenize`` and ``/detokenize``, ``/v1/models``,
``/health``, Prometheus ``/metrics`` and the web page.  A completion route is three calls:
:class:`~optkit.serve.requests.RequestPlanner` validates and expands the body,
:func:`~optkit.serve.streaming.submit` queues the sequences, and
:func:`~optkit.serve.streaming.collect` or :func:`~optkit.serve.streaming.sse` answers in
the API's format (:mod:`optkit.serve.responses`).  The scheduler's engine thread does all
model work (see :mod:`optkit.serve.scheduler`) and the planner (tokenizing, validating) runs
on a worker thread, so no endpoint blocks the event loop.

Every error, the framework's included, is an OpenAI error object ``{"error": {message, type,
param, code}}`` (``code`` a string or null), and the OpenAPI document (``/openapi.json``)
says so: each route lists the statuses it answers (400 for invalid input, never 422) with
that body.  Each request gets an id, sent back as ``X-Request-ID``; an unexpected failure is
logged with it and answered 500 ``internal error (request id ...)``, never with the
exception's text.  (No ``from __future__ import annotations`` here: FastAPI reads the
endpoints' annotations, which refer to names local to :func:`create_app`.)
"""

import logging
import uuid
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from optkit.serve.chat import get_template
from optkit.serve.guard import MAX_BODY_BYTES, Guard, accepted_key, protected_paths
from optkit.serve.metrics import Metrics
from optkit.serve.protocol import (
    TOKEN_ID,
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
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
#: one server-sent event of a stream (OpenAPI 3.1: the event-stream schema is an event's)
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a JSON chunk, an error object, or [DONE] (the last)"}}}
#: what each documented error status means (OpenAPI), all with an ErrorResponse body
ERRORS = {400: "Invalid request (schema or server limits)",
          401: "Missing or unknown API key",
          404: "Unknown model",
          413: "Request body too large",
          429: "Queue full; retry later",
          500: "Internal error (the body names the request id of the server log)",
          503: "The engine is not running (stopped or shutting down)"}


def errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` for error ``statuses`` (and 500, which any route may give)."""
    return {s: {"model": ErrorResponse, "description": ERRORS[s]}
            for s in sorted({*statuses, 500})}


def internal_error(request_id: str) -> JSONResponse:
    return JSONResponse(error_body(f"internal error (request id {request_id})", "server_error"),
                        status_code=500, headers={"X-Request-ID": request_id})


class RequestIds:
    """ASGI middleware: an id per HTTP request (``request.state.request_id``), sent back as
    ``X-Request-ID``; an exception that escapes the app before the response started is
    logged with the id and answered :func:`internal_error` (the connection stays open)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"),
                          scope.get("path"))
            if started:
                raise
            await internal_error(rid)(scope, receive, send)


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error as an OpenAI error object; refusals counted in ``metrics``."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        if exc.status in REJECTED:
            metrics.rejected.labels(REJECTED[exc.status]).inc()
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        # the most specific error: a union's members each report one, the deepest is the
        # member the value was meant as
        err = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
        loc = [x for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip()
            param = None
        else:  # the top-level field (deeper parts name union members, not fields)
            param = str(loc[0]) if loc and isinstance(loc[0], str) else None
            text = str(err.get("msg")).removeprefix("Value error, ")
            if err.get("type") in ("string_too_short", "too_short") and \
                    err.get("ctx", {}).get("min_length") == 1:
                text = "must not be empty"
            where = "".join(f"[{i}]" for i in loc[1:] if isinstance(i, int))  # list items
            msg = f"{param}{where}: {text}" if param else text
        metrics.rejected.labels("invalid").inc()
        return JSONResponse(error_body(msg, param=param, code=err.get("type")), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        typ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), typ), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # raised outside RequestIds
        rid = request_id(request)
        log.error("request %s failed", rid, exc_info=exc)
        return internal_error(rid)


def json_response(fn, body) -> Response:
    """``fn(body)``'s model as a JSON response, serialized here (called on a worker thread:
    a long token list takes a while)."""
    return Response(fn(body).model_dump_json(), media_type="application/json")


def _bound_token_ids(node, vocab_size: int) -> None:
    """Every schema in ``node`` marked as a token id gets its ``maximum``."""
    if isinstance(node, dict):
        if node.pop(TOKEN_ID, False):
            node["maximum"] = vocab_size - 1
        node = list(node.values())
    if isinstance(node, list):
        for x in node:
            _bound_token_ids(x, vocab_size)


def openapi_document(app: FastAPI, keyed: bool, vocab_size: int):
    """``app.openapi``: FastAPI's document less its 422 responses (validation errors are 400
    here, listed with each route), with a bearer scheme on the routes that take a key and
    token ids bounded by the vocabulary."""

    def openapi() -> dict:
        doc = FastAPI.openapi(app)  # cached by FastAPI; the edits below are idempotent
        _bound_token_ids(doc, vocab_size)
        for ops in doc["paths"].values():
            for op in ops.values():
                op["responses"].pop("422", None)
                if keyed and "401" in op["responses"]:
                    op["security"] = [{"bearer": []}]
        parts = doc.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            parts.get("schemas", {}).pop(name, None)
        if keyed:
            parts["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        return doc

    return openapi


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

    # token ids: below the engine's vocabulary (prompts) and the tokenizer's (/detokenize)
    app.openapi = openapi_document(app, bool(api_keys),
                                   min(engine.vocab_size, codec.vocab_size))
    add_error_handlers(app, metrics)
    app.add_middleware(RequestIds)
    Key = Annotated[str | None, Depends(accepted_key)]
    keyed = (401,) if api_keys else ()

    # Plain endpoints ----------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, responses=errors())
    async def index():
        """The web page (HTML)."""
        return page

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(icon, media_type="image/x-icon",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/health", responses={**errors(), 503: {
        "description": "The engine has stopped or the server is draining before it stops "
                       "(the same body, status 'engine stopped' or 'shutting down')",
        "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def health():
        s = scheduler.stats()
        status = ("engine stopped" if not s["alive"] else
                  "shutting down" if s["closed"] else "ok")
        return JSONResponse({"status": status, "model": model_name, **s},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors())
    async def prometheus():
        """Prometheus metrics (text exposition format)."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", responses=errors(*keyed))
    async def models(key: Key):
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "optkit",
            "max_model_len": engine.max_len, "max_slots": engine.max_slots,
            "max_logprobs": engine.max_logprobs, "requires_key": bool(api_keys),
            "chat_template": planner.template.name}]}

    @app.post("/tokenize", response_model=TokenizeResponse,
              responses=errors(400, *keyed, 404, 413))
    async def tokenize(body: TokenizeRequest, key: Key):
        return await run_in_threadpool(json_response, planner.tokenize, body)

    @app.post("/detokenize", response_model=DetokenizeResponse,
              responses=errors(400, *keyed, 404, 413))
    async def detokenize(body: DetokenizeRequest, key: Key):
        return await run_in_threadpool(json_response, planner.detokenize, body)

    # Generation ---------------------------------------------------------------------------
    async def answer(plan, fmt, stream: bool, request: Request, key: str | None):
        sub = submit(scheduler, plan, key)
        if stream:
            return StreamingResponse(sse(sub, plan, fmt), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return fmt.response(await collect(sub, plan, request.receive))

    generation = {**errors(400, *keyed, 404, 413, 429, 503),
                  200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                        "description": "The response, or with stream: true its chunks as "
                                       "server-sent events ending with 'data: [DONE]'"}}

    @app.post("/v1/completions", response_model=Completion, responses=generation)
    async def completions(body: CompletionRequest, request: Request, key: Key):
        plan = await run_in_threadpool(planner.completion, body)
        return await answer(plan, CompletionFormat(model_name, plan), bool(body.stream),
                            request, key)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=generation)
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: Key):
        plan = await run_in_threadpool(planner.chat, body)
        return await answer(plan, ChatFormat(model_name, plan), bool(body.stream), request,
                            key)

    app.add_middleware(Guard(None, keys=api_keys, protected=protected_paths(app.routes),
                             max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts,
                             metrics=metrics).around)
    return app
