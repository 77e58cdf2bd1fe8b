"""The HTTP side: a Starlette app over a `Service` (an engine behind the dynamic batcher).

Routes: `GET /health`; `POST /caption`, `/vqa` (generation models), `/itm`, `/embed` (retrieval models).
Bodies are JSON (images as base64) or multipart uploads (the image as a file part). Every error answer
is JSON `{"error": message}` with a 4xx status (503 while warming up or when the queue is full, with
Retry-After), and the server goes on serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from typing import Callable, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blip2_jax.serve import inputs
from blip2_jax.serve.batcher import Batcher, Busy, Closed
from blip2_jax.serve.engine import CompileCounter
from blip2_jax.serve.inputs import RequestError
from blip2_jax.serve.settings import Settings

log = logging.getLogger(__name__)
ROUTES = ("caption", "vqa", "itm", "embed")


class Service:
    """An engine behind a `Batcher`, warmed up on the batcher's thread: what the routes call.

    `on_failure(error)` is called when the warm-up fails (the CLI then stops the server).
    """

    def __init__(self, engine, settings: Settings, on_failure: Optional[Callable[[BaseException], None]] = None):
        self.engine, self.settings, self.on_failure = engine, settings, on_failure
        self.batcher = Batcher(engine.run, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                               queue_size=settings.queue_size)
        self.buckets = engine.buckets()
        self.buckets_ready = 0
        self.ready = False
        self.warmup_s: Optional[float] = None
        self.compiles = CompileCounter()
        self._compiles_at_ready = 0

    def start(self) -> None:
        self.batcher.start(before=self._warm_up)

    def close(self) -> None:
        self.batcher.close()
        self.compiles.close()

    def _warm_up(self) -> None:
        """Run every bucket once (each compiles its programs), then report ready."""
        start = time.perf_counter()
        try:
            for shape in self.buckets:
                self.engine.warm(shape)
                self.buckets_ready += 1
                log.info("compiled bucket %d/%d %s", self.buckets_ready, len(self.buckets), shape)
        except BaseException as e:
            if self.on_failure is not None:
                self.on_failure(e)
            raise
        self.warmup_s = time.perf_counter() - start
        self._compiles_at_ready = self.compiles.count
        self.ready = True
        log.info("ready: %d buckets compiled in %.1f s", len(self.buckets), self.warmup_s)

    def health(self) -> tuple[int, dict]:
        """`(status, body)`: 200 once every bucket is compiled, 503 before (or when the warm-up failed)."""
        body = {"ready": self.ready, "buckets_ready": self.buckets_ready, "buckets": len(self.buckets),
                "warmup_s": self.warmup_s, "queued": self.batcher.queued, "model_calls": self.batcher.batches,
                "requests_served": self.batcher.requests,
                "compiles_after_warmup": self.compiles.count - self._compiles_at_ready if self.ready else None,
                "kind": self.engine.kind, **self.engine.describe()}
        if self.batcher.failure is not None:
            body["error"] = f"warm-up failed: {type(self.batcher.failure).__name__}: {self.batcher.failure}"
        return (200 if self.ready else 503), body

    async def answer(self, route: str, fields: dict) -> dict:
        """Prepare the request off the event loop, queue it, and wait for its batch."""
        if not self.ready:
            why = (self.health()[1].get("error")
                   or f"warming up: {self.buckets_ready}/{len(self.buckets)} buckets compiled")
            raise RequestError(503, why, {"Retry-After": "5"})
        key, payload = await run_in_threadpool(self.engine.prepare, route, fields)
        try:
            future = self.batcher.submit(key, payload)
        except Busy as e:
            raise RequestError(503, f"busy: {e}", {"Retry-After": "1"}) from None
        except Closed as e:
            raise RequestError(503, str(e)) from None
        try:
            result = await asyncio.wrap_future(future)
        except Closed as e:
            raise RequestError(503, str(e)) from None
        return self.engine.respond(route, result)


async def read_fields(request: Request, schema: dict, max_bytes: int) -> dict:
    """The request's fields: a JSON object or a multipart upload, at most `max_bytes` long."""
    length = request.headers.get("content-length")
    if length is None:
        raise RequestError(411, "a Content-Length header is required")
    if not length.isdigit():
        raise RequestError(400, f"bad Content-Length {length!r}")
    if int(length) > max_bytes:
        raise RequestError(413, f"the body is {length} bytes, more than this server's limit of {max_bytes}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=4, max_fields=16, max_part_size=max_bytes) as form:
            parts = [(k, v if isinstance(v, str) else await v.read()) for k, v in form.multi_items()]
        return inputs.form_fields(parts, schema)
    if content_type not in ("", "application/json"):
        raise RequestError(415, f"Content-Type {content_type!r}: send application/json (images as base64) or a "
                                "multipart/form-data upload")
    return inputs.check_fields(inputs.parse_json(await request.body()), schema)


def _endpoint(service: Service, route: str):
    async def endpoint(request: Request) -> JSONResponse:
        if route not in service.engine.routes:
            served = ", ".join(f"/{r}" for r in service.engine.routes)
            raise RequestError(404, f"/{route} is not served for this model (a {service.engine.kind} model; it "
                                    f"serves {served})")
        fields = await read_fields(request, service.engine.routes[route], service.settings.max_body_bytes)
        return JSONResponse(await service.answer(route, fields))
    endpoint.__name__ = route
    return endpoint


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def build_app(service: Service) -> Starlette:
    """The Starlette app; its lifespan starts the service (warm-up, then batching) and closes it."""
    async def health(request: Request) -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await run_in_threadpool(service.close)

    routes = [Route("/health", health, methods=["GET"])]
    routes += [Route(f"/{r}", _endpoint(service, r), methods=["POST"]) for r in ROUTES]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        RequestError: _request_error, HTTPException: _http_error, Exception: _internal_error})


# -- running ------------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(service: Service, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for the service's app. Its own connection limit sits well above the queue's, so
    that a full queue is answered by the app (JSON 503) rather than by uvicorn."""
    config = uvicorn.Config(build_app(service), log_level=log_level, access_log=False, lifespan="on",
                            limit_concurrency=4 * (service.settings.queue_size + service.settings.max_batch) + 64,
                            timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


@dataclasses.dataclass
class Running:
    """A server running on a background thread (tests, benchmarks): `url`, and `stop()`."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    service: Service

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(service: Service, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Serve `service` on a background thread (the warm-up starts at once; /health says when it is done)."""
    sock = bind(host, port)
    server = uvicorn_server(service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="blip2_jax.serve.http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return Running(url_of(sock), server, thread, service)
