"""The Starlette application: OpenAI's routes over one GenerationWorker.

Handlers validate a request, queue it for the worker and answer with a GenerationResponse,
which sends the JSON answer or the server-sent events of a streamed one, and watches the
connection meanwhile: a client that goes away cancels its generation, queued or running.
Starlette rather than FastAPI: the OpenAI error bodies and statuses come from our own
validation (FastAPI's would be 422s of another shape), and the streaming path is written
against ASGI directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
from dataclasses import dataclass

import psutil
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from localv3.serve.answer import Delta
from localv3.serve.errors import ApiError, bad_request, server_error
from localv3.serve.replies import ChatReplies, CompletionReplies, Replies
from localv3.serve.requests import parse_chat_request, parse_completion_request
from localv3.serve.turns import Finished, chat_work, completion_work
from localv3.serve.worker import Disconnected, Failed, GenerationWorker, Job

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies: pass each event on at once
]
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class AppSettings:
    served_name: str
    api_key: str | None = None
    max_body_bytes: int = 16 << 20


def create_app(worker: GenerationWorker, settings: AppSettings) -> Starlette:
    started = int(time.time())

    async def models(request: Request) -> JSONResponse:
        entry = {"id": settings.served_name, "object": "model", "created": started, "owned_by": "localv3"}
        if request.path_params.get("model") not in (None, settings.served_name):
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist", code="model_not_found")
        return JSONResponse(entry if "model" in request.path_params else {"object": "list", "data": [entry]})

    async def chat(request: Request) -> GenerationResponse:
        parsed = parse_chat_request(await read_json(request, settings.max_body_bytes), settings.served_name)
        job = Job(chat_work(parsed), asyncio.get_running_loop())
        worker.submit(job)
        return GenerationResponse(job, ChatReplies(settings.served_name, parsed.include_usage), parsed.stream)

    async def completions(request: Request) -> GenerationResponse:
        parsed = parse_completion_request(await read_json(request, settings.max_body_bytes), settings.served_name)
        job = Job(completion_work(parsed), asyncio.get_running_loop())
        worker.submit(job)
        return GenerationResponse(job, CompletionReplies(settings.served_name, parsed.include_usage), parsed.stream)

    async def health(request: Request) -> JSONResponse:
        if worker.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading" if worker.load_error is None else "failed"}, status_code=503)

    async def metrics(request: Request) -> JSONResponse:
        counters = worker.counters
        return JSONResponse(
            {
                "model": settings.served_name,
                "ready": worker.ready,
                "uptime_s": time.time() - started,
                "waiting": worker.waiting,
                "requests": counters.requests,
                "failed": counters.failed,
                "cancelled": counters.cancelled,
                "prompt_tokens": counters.prompt_tokens,
                "cached_tokens": counters.cached_tokens,
                "completion_tokens": counters.completion_tokens,
                "busy_s": counters.busy_s,
                "completion_tok_s": counters.completion_tokens / counters.busy_s if counters.busy_s else 0.0,
                "last": counters.last,
                "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {ApiError: api_error_response, HTTPException: http_error_response, Exception: internal_error_response}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    if settings.api_key:
        app.add_middleware(BearerKey, key=settings.api_key)
    return app


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large(limit)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise bad_request("the request body nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")


async def api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def http_error_response(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths (404) and methods (405) as OpenAI error objects too."""
    return JSONResponse(ApiError(exc.status_code, exc.detail).body(), status_code=exc.status_code, headers=exc.headers)


async def internal_error_response(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the client gets an OpenAI error object (uvicorn logs the traceback)."""
    return JSONResponse(server_error(f"{type(exc).__name__}: {exc}").body(), status_code=500)


class BearerKey:
    """Every request but /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class GenerationResponse:
    """The answer of one job: an error status, a JSON object, or server-sent events."""

    def __init__(self, job: Job, replies: Replies, stream: bool):
        self.job = job
        self.replies = replies
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            events = await self.job.next_events()
            if isinstance(events[0], Failed):
                await send_json(send, events[0].error.status, events[0].error.body())
            elif not isinstance(events[0], Disconnected):
                await (self._send_stream(events, send) if self.stream else self._send_whole(events, send))
        except OSError:  # the connection broke while sending
            pass
        finally:
            watcher.cancel()
            self.job.cancel()  # a no-op for a finished job; stops one whose client is gone

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.job.disconnect()

    async def _send_whole(self, events: list, send: Send) -> None:
        answer = Delta()
        while True:
            for event in events:
                if isinstance(event, Delta):
                    answer.add(event)
                elif isinstance(event, Finished):
                    await send_json(send, 200, self.replies.whole(answer, event))
                    return
                elif isinstance(event, Failed):
                    await send_json(send, event.error.status, event.error.body())
                    return
                else:  # Disconnected
                    return
            events = await self.job.next_events()

    async def _send_stream(self, events: list, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        while True:
            data, done = bytearray(), False
            for event in events:
                if isinstance(event, Disconnected):
                    return
                payloads = [event.error.body()] if isinstance(event, Failed) else self.replies.chunks(event)
                data += b"".join(b"data: " + json.dumps(p, ensure_ascii=False).encode() + b"\n\n" for p in payloads)
                done = not isinstance(event, Delta)
                if done:
                    data += DONE
                    break
            await send({"type": "http.response.body", "body": bytes(data), "more_body": not done})
            if done:
                return
            events = await self.job.next_events()


async def send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})
