"""The HTTP API: FastAPI routes over the engine bridge, behind a guard that checks the API key,
the body size and whether the server is draining before any route runs.

    state = ServerState(bridge, tokenizer, limits, metrics, api_key="", max_body_bytes=1 << 20)
    asgi = build_app(state)                # what uvicorn serves

POST /v1/completions, POST /v1/chat/completions (stream: server-sent events), GET /v1/models,
GET /health (200, or 503 while draining or when the engine failed), GET /metrics (Prometheus
text), GET /openapi.json (FastAPI's spec, corrected: polar_dist/server/openapi.py). Errors are
OpenAI-style bodies (polar_dist/server/errors.py).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from polar_dist.engine.engine import EngineDeadError
from polar_dist.errors import UserError
from polar_dist.log import get_logger
from polar_dist.models.tokenizer import Tokenizer
from polar_dist.server import responses
from polar_dist.server.engine_loop import EngineLoop
from polar_dist.server.errors import APIError, error_body, unreadable_body, validation_message
from polar_dist.server.generation import ClientGone, Generation, RequestFailed
from polar_dist.server.metrics import ServerMetrics
from polar_dist.server.openapi import publish_spec
from polar_dist.server.prepare import Job, Limits, chat_job, completion_job
from polar_dist.server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                        CompletionChunk, CompletionRequest, CompletionResponse, ErrorResponse,
                                        ModelList)

log = get_logger(__name__)

OPEN_PATHS = ("/health", "/metrics")  # served without the API key: probes and scrapers
API_PREFIX = "/v1/"


@dataclass
class ServerState:
    bridge: EngineLoop
    tokenizer: Tokenizer
    limits: Limits
    metrics: ServerMetrics
    api_key: str = ""
    max_body_bytes: int = 1 << 20
    draining: bool = False
    in_flight: int = 0  # API requests being answered (streams until their last event)
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def accepting(self) -> bool:
        return self.bridge.healthy and not self.draining


_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           413: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 500: {"model": ErrorResponse},
           503: {"model": ErrorResponse}}  # 500: a request that failed alone in the engine
_BODIES: dict[str, type[BaseModel]] = {"/v1/completions": CompletionRequest,
                                       "/v1/chat/completions": ChatCompletionRequest}


def build_app(state: ServerState) -> ASGIApp:
    app = FastAPI(title="polar_dist", summary="OpenAI-compatible API of a tensor-parallel runtime",
                  openapi_url="/openapi.json", docs_url=None, redoc_url=None)
    _add_error_handlers(app)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        job = completion_job(body, state.tokenizer, state.limits)
        return await _answer(state, request, job, responses.completion_body, responses.completion_events, "cmpl")

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = chat_job(body, state.tokenizer, state.limits)
        return await _answer(state, request, job, responses.chat_body, responses.chat_events, "chatcmpl")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.limits.model_name, "object": "model",
                                            "created": state.started_at, "owned_by": "polar_dist",
                                            "max_model_len": state.limits.max_seq_len}]}

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if state.accepting:
            return JSONResponse({"status": "ok"})
        why = "the server is shutting down" if state.draining else \
            f"the engine cannot serve: {state.bridge.failure or state.bridge.engine.failure}"
        return JSONResponse(error_body(503, why), status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        state.metrics.in_flight.set(state.in_flight)
        state.metrics.healthy.set(1 if state.accepting else 0)
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    publish_spec(app, streams={"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk})
    return Guard(app, state)


async def _answer(state: ServerState, request: Request, job: Job,
                  body: Callable[[Generation, responses.Meta], Awaitable[dict[str, Any]]],
                  events: Callable[[Generation, responses.Meta], AsyncIterator[str]], prefix: str) -> Response:
    if not state.accepting:
        raise APIError(503, "the server is shutting down" if state.draining else "the engine cannot serve")
    if state.bridge.room() < len(job.choices):
        raise APIError(429, f"the queue is full (server.max_queued_requests = {state.bridge.max_queued}); retry "
                            "later", headers={"Retry-After": "1"})
    gen = Generation(state.bridge, state.tokenizer, job, state.metrics, request.is_disconnected)
    try:
        gen.start()
    except EngineDeadError as e:
        gen.abort()
        raise APIError(503, str(e)) from None
    state.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
    meta = responses.Meta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), state.limits.model_name)
    if job.stream:
        return _EventStream(events(gen, meta), gen)
    try:
        return JSONResponse(await body(gen, meta))
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    except UserError as e:
        raise APIError(400, str(e)) from None
    except RequestFailed as e:
        raise APIError(500, str(e)) from None
    except EngineDeadError as e:
        raise APIError(503, str(e)) from None


class _EventStream(StreamingResponse):
    """Server-sent events that abort the generation however the response ends (a client that
    disconnects mid-stream cancels the response: its engine requests free their blocks)."""

    def __init__(self, events: AsyncIterator[str], gen: Generation) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.abort()


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, APIError)
        return e.response()

    async def invalid(request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        errors = list(e.errors())
        model = _BODIES.get(request.url.path)
        descriptions = {k: f.description for k, f in model.model_fields.items() if f.description} if model else {}
        message, param = validation_message(errors, descriptions, e.body) if errors else ("invalid request", None)
        return JSONResponse(error_body(400, message, param), status_code=400)

    async def http_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, StarletteHTTPException)
        message = {404: "no such endpoint; see /openapi.json", 405: "method not allowed for this endpoint"}.get(
            e.status_code, str(e.detail))
        if e.status_code == 400:  # FastAPI could not parse the body
            message = f"the request body could not be read: {unreadable_body(e.__cause__)}; send a JSON object"
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    async def user_error(_: Request, e: Exception) -> Response:
        return JSONResponse(error_body(400, str(e)), status_code=400)

    async def bug(_: Request, e: Exception) -> Response:
        log.exception("internal error while answering a request")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(Exception, bug)


class Guard:
    """ASGI middleware in front of every route: API key, draining, body size, in-flight count,
    request counter. Bodies are read here (at most max_body_bytes + 1 bytes) and replayed."""

    def __init__(self, app: FastAPI, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        st = self.state
        if st.api_key and path not in OPEN_PATHS and not self._authorized(scope):
            await self._reject(path, send, APIError(401, "missing or wrong API key; send the header "
                                                         "'Authorization: Bearer <key>'", code="invalid_api_key"))
            return
        if not path.startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        if not st.accepting:
            await self._reject(path, send, APIError(503, "the server is shutting down" if st.draining
                                                    else "the engine cannot serve"))
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 0

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        st.in_flight += 1
        try:
            await self.app(scope, replay, counted)
        finally:
            st.in_flight -= 1
            st.metrics.requests.inc(status=str(status or 499))

    async def _reject(self, path: str, send: Send, error: APIError) -> None:
        if path.startswith(API_PREFIX):
            self.state.metrics.requests.inc(status=str(error.status))
        await _send_error(send, error)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # constant-time: the time taken does not tell how much of the key matched
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                           self.state.api_key.encode())
        return False

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        limit = self.state.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes (server.max_body_bytes)")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._reject(scope["path"], send, too_large)
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(scope["path"], send, too_large)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _send_error(send: Send, error: APIError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
