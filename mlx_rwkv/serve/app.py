"""The OpenAI-compatible HTTP API on Starlette (ASGI): routes, auth, streaming, disconnects.

Routes: GET /health (no key needed), GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions (`stream` false: one JSON; true: server-sent events, one
`data: {chunk}` per text delta, a last chunk with `finish_reason`, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`). Every error, including 404/405 for
unknown routes and 401 without the right `Authorization: Bearer <key>`, is answered in OpenAI's
error shape. A client that disconnects (streaming or not) is noticed through the ASGI
`http.disconnect` message, not at the next write, and its row leaves the batch at the next step.

The handlers never touch the model: they parse, submit to the `Engine` and relay its events,
which arrive from the engine thread through `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from typing import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import protocol
from .chat_format import answer_text
from .engine import Delta, Done, Engine, Event, Failed
from .protocol import APIError


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Subscription:
    """A submitted request and the asyncio queue its engine events arrive on."""

    def __init__(self, engine: Engine, parsed: protocol.Parsed):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.engine = engine
        self.id = engine.submit(parsed.request, lambda ev: loop.call_soon_threadsafe(self.events.put_nowait, ev))

    async def texts(self, kind: str) -> AsyncIterator[Delta | Done | Failed]:
        """The events, with the chat answer's leading space (after "Assistant:") removed."""
        started = kind != "chat"
        while True:
            ev = await self.events.get()
            if isinstance(ev, Delta) and not started:
                if not ev.text:
                    continue
                ev, started = Delta(answer_text(ev.text)), True
                if not ev.text:
                    continue
            yield ev
            if not isinstance(ev, Delta):
                return


class _EventStream:
    """Server-sent events for one request (an ASGI response with no Content-Length); cancels the
    request when the client disconnects."""

    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

    def __init__(self, sub: _Subscription, parsed: protocol.Parsed, model_id: str):
        self.sub, self.parsed, self.model_id = sub, parsed, model_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.HEADERS})
        finished = False
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self._events(send)
                finished = True
            except OSError:  # the client went away while we wrote
                pass
            tg.cancel_scope.cancel()
        if not finished:
            self.sub.engine.cancel(self.sub.id)

    async def _events(self, send: Send) -> None:
        kind, rid, mid = self.parsed.kind, protocol.new_id(self.parsed.kind), self.model_id

        async def event(data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": True})

        if kind == "chat":
            await event(protocol.chunk(kind, rid, mid, "", role=True))
        async for ev in self.sub.texts(kind):
            if isinstance(ev, Delta):
                await event(protocol.chunk(kind, rid, mid, ev.text))
            elif isinstance(ev, Done):
                await event(protocol.chunk(kind, rid, mid, None, ev.finish_reason))
                if self.parsed.include_usage:
                    await event(protocol.usage_chunk(kind, rid, mid, ev))
            else:
                await event(APIError(ev.status, ev.message).body())
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ApiKey:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <key>` (else 401)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                e = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(engine: Engine, tokenizer, model_id: str, *, api_key: str | None = None,
             max_prompt_tokens: int | None = None) -> Starlette:
    """The ASGI app; its lifespan starts the engine thread and stops it (failing what is left)."""
    created = int(time.time())
    vocab = engine.model.config.vocab_size
    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-rwkv"}

    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, **engine.stats()})

    async def models(request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: HTTPRequest) -> Response:
        if request.path_params["model"] != model_id:
            raise APIError(404, f"the model {request.path_params['model']!r} does not exist", "model", "model_not_found")
        return JSONResponse(model_card)

    async def generate(request: HTTPRequest, kind: str) -> Response | _EventStream:
        parsed = protocol.parse(kind, protocol.parse_json(await request.body()), tokenizer, model_id, vocab,
                                max_prompt_tokens)
        try:
            sub = _Subscription(engine, parsed)
        except RuntimeError as e:  # shutting down
            raise APIError(503, str(e)) from None
        if parsed.stream:
            return _EventStream(sub, parsed, model_id)
        collect = asyncio.ensure_future(_collect(sub, kind))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():
            engine.cancel(sub.id)
            collect.cancel()
            return Response(status_code=499)  # nobody reads it
        gone.cancel()
        text, last = collect.result()
        if isinstance(last, Failed):
            raise APIError(last.status, last.message)
        return JSONResponse(protocol.response(kind, protocol.new_id(kind), model_id, text, last))

    async def completions(request: HTTPRequest) -> Response | _EventStream:
        return await generate(request, "completion")

    async def chat(request: HTTPRequest) -> Response | _EventStream:
        return await generate(request, "chat")

    async def api_error(request: HTTPRequest, e: Exception) -> Response:
        return error_response(e)

    async def http_error(request: HTTPRequest, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        text = "no such route" if e.status_code == 404 else e.detail
        return error_response(APIError(e.status_code, f"{text}: {request.method} {request.url.path}"))

    async def server_error(request: HTTPRequest, e: Exception) -> Response:
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = Starlette(
        routes=[Route("/health", health), Route("/v1/models", models), Route("/v1/models/{model:path}", model),
                Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat, methods=["POST"])],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan)
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    return app


async def _collect(sub: _Subscription, kind: str) -> tuple[str, Done | Failed]:
    parts = []
    async for ev in sub.texts(kind):
        if isinstance(ev, Delta):
            parts.append(ev.text)
        else:
            return "".join(parts), ev
    raise AssertionError("the event stream ended without Done or Failed")
