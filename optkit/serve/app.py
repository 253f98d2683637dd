"""The HTTP server: OpenAI-compatible completions, health, metrics and the web page.

``create_app(scheduler, codec, model_name)`` returns a FastAPI app; the scheduler's engine
thread does all model work and hands outputs back with ``loop.call_soon_threadsafe`` (see
:mod:`optkit.serve.scheduler` for the threads and queues), so no endpoint ever blocks the
event loop.  Every error is an OpenAI error object ``{"error": {message, type, param, code}}``.
(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations,
which refer to names local to :func:`create_app`.)
"""

import asyncio
import json
import logging
import secrets
import weakref
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from optkit.serve.engine import SamplingParams
from optkit.serve.metrics import Metrics
from optkit.serve.protocol import (
    Choice,
    Completion,
    CompletionRequest,
    Logprobs,
    Usage,
    completion_id,
    error_body,
    now,
)
from optkit.serve.scheduler import Handle, Output, QueueFull, RequestError, Scheduler, SeqRequest
from optkit.serve.text import Codec, TokenEntry

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


def read_api_keys(path) -> dict[str, float]:
    """API keys file: one ``KEY [WEIGHT]`` per line (weight 1 when left out; ``#`` comments).
    A key's weight is its share of admissions while requests wait."""
    keys: dict[str, float] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2:
            raise ValueError(f"{path}:{n}: expected 'KEY [WEIGHT]', got {line!r}")
        try:
            weight = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            raise ValueError(f"{path}:{n}: weight {parts[1]!r} is not a number") from None
        if not weight > 0:
            raise ValueError(f"{path}:{n}: weight must be positive")
        keys[parts[0]] = weight
    if not keys:
        raise ValueError(f"{path}: no API keys")
    return keys


def _logprobs(entries: list[TokenEntry]) -> Logprobs:
    return Logprobs(tokens=[e.token for e in entries],
                    token_logprobs=[e.logprob for e in entries],
                    top_logprobs=[e.top for e in entries],
                    text_offset=[e.offset for e in entries])


class _Collected:
    """Everything one sequence produced (non-streaming responses)."""

    def __init__(self):
        self.text, self.entries, self.final = [], [], None

    def add(self, out: Output) -> None:
        if out.prompt_text is not None:
            self.text.append(out.prompt_text)
            self.entries.extend(out.prompt_entries or [])
        self.text.append(out.text)
        self.entries.extend(out.entries)
        if out.finish_reason is not None:
            self.final = out


def create_app(scheduler: Scheduler, codec: Codec, model_name: str, *,
               api_keys: Mapping[str, float] | None = None, max_n: int = 16,
               metrics: Metrics | None = None, aliases: tuple[str, ...] = ()) -> FastAPI:
    """FastAPI app serving ``scheduler`` (started and stopped with the app)."""
    metrics = metrics or scheduler.metrics or Metrics()
    if scheduler.metrics is None:
        scheduler.metrics = metrics
    metrics.bind(scheduler)
    names = {model_name, *aliases}
    engine = scheduler.engine
    page = (STATIC / "index.html").read_text()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="optkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions over a continuous-batching "
                              "engine")
    app.state.scheduler = scheduler
    app.state.metrics = metrics

    # Errors -------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [x for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip()
            param = None
        else:  # the top-level field (deeper parts name union members, not fields)
            param = str(loc[0]) if loc and isinstance(loc[0], str) else None
            msg = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
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

    async def auth(request: Request) -> str | None:
        if not api_keys:
            return None
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if key not in api_keys:
            metrics.rejected.labels("auth").inc()
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer "
                                "KEY')", code="invalid_api_key")
        return key

    Key = Annotated[str | None, Depends(auth)]

    # Plain endpoints ----------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

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
            "max_logprobs": engine.max_logprobs, "requires_key": bool(api_keys)}]}

    # Completions --------------------------------------------------------------------------
    def plan(body: CompletionRequest) -> tuple[list[list[int]], list[SeqRequest], int, int]:
        """Tokenize and expand a request into sequences (prompt-major, best_of each)."""
        if body.model not in names:
            raise APIError(404, f"the model {body.model!r} does not exist; this server "
                                f"serves {model_name!r}", param="model",
                           code="model_not_found")
        n = body.n or 1
        best_of = body.best_of or n
        if best_of < n:
            raise APIError(400, "best_of must be at least n", param="best_of")
        if best_of > max_n:
            raise APIError(400, f"n and best_of may be at most {max_n}",
                           param="best_of" if body.best_of else "n")
        if body.stream and best_of > n:
            raise APIError(400, "best_of > n cannot be streamed", param="best_of")
        prompts = []
        for p in body.prompts():
            ids = codec.encode(p) if isinstance(p, str) else list(p)
            prompts.append(ids)
        total = len(prompts) * best_of
        if total > scheduler.limits.max_queue:
            raise APIError(400, f"{total} sequences in one request; the server queues at most "
                                f"{scheduler.limits.max_queue}", param="prompt")
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        temperature = 1.0 if body.temperature is None else body.temperature
        seqs = [SeqRequest(
            prompt=tuple(ids), max_tokens=16 if body.max_tokens is None else body.max_tokens,
            sampling=SamplingParams(temperature=temperature,
                                    top_p=1.0 if body.top_p is None else body.top_p,
                                    top_k=max(body.top_k or 0, 0),
                                    seed=seed, stream=j),
            stop=body.stops(), logprobs=body.logprobs, echo=bool(body.echo))
            for ids in prompts for j in range(best_of)]
        for s in seqs:
            scheduler.check(s)
        return prompts, seqs, n, best_of

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: Key):
        try:
            prompts, seqs, n, best_of = plan(body)  # tokenizing is fast: no thread hop
        except RequestError as e:
            metrics.rejected.labels("invalid").inc()
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Handle, Output]] = asyncio.Queue()

        def on_output(h: Handle, out: Output) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (h, out))
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        try:
            handles = scheduler.submit(seqs, key=key, on_output=on_output)
        except QueueFull as e:
            metrics.rejected.labels("queue_full").inc()
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except RuntimeError as e:
            raise APIError(503, str(e), "server_error") from None
        index = {h.id: i for i, h in enumerate(handles)}
        rid, created = completion_id(), now()
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream(queue, handles, index, rid, created, body.logprobs is not None,
                             include_usage, prompt_tokens)
            # a client gone before the first byte: the generator never runs its ``finally``
            weakref.finalize(events, _cancel_all, handles)
            return StreamingResponse(
                events, media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
        got = {h.id: _Collected() for h in handles}
        try:
            done = 0
            while done < len(handles):
                h, out = await queue.get()
                got[h.id].add(out)
                done += out.finish_reason is not None
        finally:
            watcher.cancel()
            _cancel_all(handles)
        _raise_failures([got[h.id].final for h in handles])
        choices, completion_tokens = [], 0
        for i in range(len(prompts)):
            cands = [got[h.id] for h in handles[i * best_of:(i + 1) * best_of]]
            if best_of > n:
                cands = sorted(cands, key=lambda c: -c.final.cum_logprob)[:n]
            for j, c in enumerate(cands):
                completion_tokens += c.final.num_generated
                choices.append(Choice(
                    index=i * n + j, text="".join(c.text),
                    logprobs=_logprobs(c.entries) if body.logprobs is not None else None,
                    finish_reason=c.final.finish_reason))
        return Completion(id=rid, created=created, model=model_name, choices=choices,
                          usage=Usage(prompt_tokens=prompt_tokens,
                                      completion_tokens=completion_tokens,
                                      total_tokens=prompt_tokens + completion_tokens))

    async def _stream(queue, handles, index, rid, created, want_logprobs, include_usage,
                      prompt_tokens):
        try:
            remaining, completion_tokens = len(handles), 0
            while remaining:
                h, out = await queue.get()
                if out.finish_reason is not None:
                    remaining -= 1
                    completion_tokens += out.num_generated
                    if out.finish_reason not in ("stop", "length"):
                        msg = out.error or f"the request was {out.finish_reason}"
                        yield _sse(error_body(msg, "server_error"))
                        return
                entries = (out.prompt_entries or []) + out.entries
                chunk = Completion(id=rid, created=created, model=model_name, choices=[Choice(
                    index=index[h.id], text=(out.prompt_text or "") + out.text,
                    logprobs=_logprobs(entries) if want_logprobs else None,
                    finish_reason=out.finish_reason)])
                yield _sse(chunk.model_dump(exclude_none=False))
            if include_usage:
                yield _sse(Completion(id=rid, created=created, model=model_name, choices=[],
                                      usage=Usage(prompt_tokens=prompt_tokens,
                                                  completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens +
                                                  completion_tokens)).model_dump())
            yield "data: [DONE]\n\n"
        finally:  # normal end, client gone (the response task is cancelled) or error
            _cancel_all(handles)

    return app


def _cancel_all(handles: list[Handle]) -> None:
    for h in handles:
        h.cancel()  # a no-op once finished


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _raise_failures(finals: list[Output]) -> None:
    for out in finals:
        if out.finish_reason not in ("stop", "length"):
            raise APIError(500 if out.finish_reason == "error" else 503,
                           out.error or f"the request was {out.finish_reason}", "server_error")


async def _cancel_on_disconnect(request: Request, handles: list[Handle]) -> None:
    """Cancel ``handles`` when the client goes away (non-streaming requests)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            _cancel_all(handles)
            return
