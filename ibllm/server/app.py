"""The FastAPI application: routes, the API key, the body-size limit, OpenAI-shaped errors and SSE."""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ibllm.server.messages import prepare
from ibllm.server.scheduler import Job, Scheduler
from ibllm.server.schemas import (APIError, ServerConfig, VisualCacheOptions, chunk_body, completion_body,
                                  completion_id, parse_request, usage)

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a waiting request looks for a client that went away


def check_key(request: Request, config: ServerConfig) -> None:
    """401 unless the request carries ``Authorization: Bearer <api key>`` (when a key is set)."""
    if not config.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key", kind="authentication_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; the limit is {limit} bytes "
                            "(--max-body-mb)", code="payload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes (--max-body-mb)",
                           code="payload_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def next_event(job: Job, request: Request | None, deadline: float, timeout_s: float) -> tuple[Any, ...]:
    """The job's next event; cancels the job and raises when the client left or the deadline passed."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            job.cancel("timed_out")
            raise APIError(504, f"the request took longer than the server's timeout ({timeout_s:g} s)",
                           code="timeout", kind="timeout_error")
        try:
            return await asyncio.wait_for(job.events.get(), min(POLL_S, remaining))
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                job.cancel()
                raise APIError(499, "the client closed the connection", code="client_closed") from None


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(model: Any, config: ServerConfig) -> FastAPI:
    """The API application over an ``InferenceModel``; the scheduler runs while the app does."""
    scheduler = Scheduler(model, config)

    def cache_for(options: VisualCacheOptions | None) -> Any:
        """The loaded cache (None: none), off, or a per-request copy with the request's constants."""
        if options is None:
            return model.cache
        if not options.enabled:
            return None
        if model.cache is None:
            raise APIError(400, "visual_cache: no visual cache is loaded (start the server with --cache PATH)",
                           param="visual_cache")
        cache = copy.copy(model.cache)  # the shared cache is never modified
        for name in ("k", "temperature", "weight"):
            if (value := getattr(options, name)) is not None:
                setattr(cache, name, value)
        return cache

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="ibllm OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # no docs pages: they load scripts from a CDN
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__})").body(), status_code=500)

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "ibllm",
                "max_model_len": model.max_seq_len, "modalities": list(model.modalities),
                "visual_cache": model.cache is not None}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_name, **scheduler.status()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request, config)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request, config)
        if model_id != config.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {config.model_name!r}",
                           code="model_not_found", param="model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request, config)
        body = await read_body(request, config.max_body_bytes)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        req = parse_request(data)
        if req.model != config.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {config.model_name!r}",
                           code="model_not_found", param="model")
        prepared = await run_in_threadpool(prepare, req, model, config, cache_for)
        job = Job(prepared, asyncio.get_running_loop())
        scheduler.submit(job)
        deadline = job.arrived + config.timeout_s
        try:
            event = await next_event(job, request, deadline, config.timeout_s)
        except BaseException:
            job.cancel()
            raise
        if event[0] == "error":
            raise event[1]
        cid, n_prompt = completion_id(), len(prepared.ids)
        if not req.stream:
            pieces = []
            try:
                while (event := await next_event(job, request, deadline, config.timeout_s))[0] == "delta":
                    pieces.append(event[1])
            finally:
                job.cancel()  # a no-op once the job is done
            if event[0] == "error":
                raise event[1]
            return completion_body(cid, config.model_name, "".join(pieces), event[1], n_prompt, event[2])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            created = int(time.time())
            try:
                yield sse(chunk_body(cid, config.model_name, created, {"role": "assistant", "content": ""}))
                while True:
                    try:
                        event = await next_event(job, None, deadline, config.timeout_s)
                    except APIError as e:
                        event = ("error", e)
                    if event[0] == "delta":
                        yield sse(chunk_body(cid, config.model_name, created, {"content": event[1]}))
                        continue
                    if event[0] == "error":
                        yield sse(event[1].body())
                    else:
                        yield sse(chunk_body(cid, config.model_name, created, {}, finish_reason=event[1]))
                        if include_usage:
                            yield sse(chunk_body(cid, config.model_name, created, None,
                                                 usage_counts=usage(n_prompt, event[2])))
                    yield sse("[DONE]")
                    return
            finally:  # also when the client disconnects mid-stream
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
