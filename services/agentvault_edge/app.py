"""The aiohttp application: one generic handler that transcodes every annotated route to its gRPC method."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import grpc
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf import message
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from agentvault.common import tracing
from agentvault.common.logs import request_id_var
from agentvault.common.settings import SettingsError
from agentvault_edge import advertisement, errors
from agentvault_edge.a2a_routes import A2ARoutes
from agentvault_edge.backends import Backends
from agentvault_edge.console import Console
from agentvault_edge.forwarding import forwarded_metadata, is_metadata_text
from agentvault_edge.http_request import HttpRequestParts, build_request
from agentvault_edge.json_in import json_to_message
from agentvault_edge.json_out import dumps, response_to_json
from agentvault_edge.mcp_endpoint import McpEndpoint
from agentvault_edge.oauth_routes import OAuthRoutes, from_edge_error
from agentvault_edge.openapi import build_openapi
from agentvault_edge.request_body import parse_body, parse_json, read_body
from agentvault_edge.responses import error_response, json_response
from agentvault_edge.routes import (
    RESUME_EVENT_FIELD,
    RESUME_REQUEST_FIELD,
    Route,
    RouteTable,
    build_routes,
    discover_services,
)
from agentvault_edge.server import DRAIN_KEY, Drain, EdgeRequestHandler
from agentvault_edge.settings import EdgeSettings
from agentvault_edge.transcode import FieldError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 128
MAX_QUERY_FIELDS = 256
# How long an EventSource client should wait before reconnecting after the edge closed its stream.
SSE_RETRY_MS = 1000
# Seconds a stream waits for its first message before the HTTP response starts without it.
FIRST_MESSAGE_WAIT = 1.0
# Seconds between WebSocket pings: a client that vanished without a close is noticed within two of them.
WS_HEARTBEAT = 30.0

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests answered by the edge.", ["method", "route", "code"])
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request at the edge, backend call included.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

EDGE_KEY: web.AppKey[Edge] = web.AppKey("edge")
# The matched route template, for the metrics labels: set by the handler, read by the middleware (same task).
_route_var: contextvars.ContextVar[str] = contextvars.ContextVar("edge_route", default="unmatched")


def _request_id(header: str | None) -> str:
    if header and len(header) <= MAX_REQUEST_ID and is_metadata_text(header) and header.strip():
        return header
    return uuid.uuid4().hex


class Edge:
    """Routes HTTP requests to backend RPCs; holds the route table and the backend channels."""

    def __init__(self, settings: EdgeSettings, table: RouteTable) -> None:
        self.settings = settings
        self.table = table
        self.backends = Backends(settings.backends)
        self.drain = Drain()
        self.oauth = OAuthRoutes(settings, self.backends)
        self.a2a = A2ARoutes(settings, self.backends, self.drain)
        self.mcp = McpEndpoint(settings, self.backends)
        self.console = Console(settings, self.backends)
        self._openapi: bytes | None = None
        self._fixed: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics,
            "/api/v1/openapi.json": self.openapi,
            advertisement.PATH: self.advertisement,
        }
        self._advertisement: bytes | None = None

    # ------------------------------------------------------------------------------- middleware

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        rid = _request_id(request.headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(rid)
        route_token = _route_var.set("unmatched")
        start = time.perf_counter()
        response: web.StreamResponse
        protocol = request.protocol
        try:
            if isinstance(protocol, EdgeRequestHandler):
                protocol.request_started()
                if protocol.over_limit:
                    raise errors.too_many_connections(self.settings.max_connections)
            if self.drain.started:
                raise errors.shutting_down()
            # Probes and scrapes (the fixed routes) are not traced: they would be most of the spans.
            traced = tracing.recording() and request.rel_url.raw_path not in self._fixed
            response = await (self._traced(request, handler) if traced else handler(request))
        except errors.EdgeError as exc:
            # The OAuth endpoints answer in RFC 6749's error shape, never the edge's, whatever refused them.
            response = from_edge_error(exc) if self.oauth.owns(request.rel_url.raw_path) else error_response(exc)
        except web.HTTPException as exc:
            # Raised by aiohttp itself (e.g. a malformed request line it still hands over).
            response = error_response(
                errors.EdgeError(exc.status, grpc.StatusCode.INVALID_ARGUMENT, exc.reason or "bad request")
            )
        except Exception:
            log.exception("unhandled error for %s %s", request.method, request.rel_url.raw_path)
            failure = errors.internal(rid)
            response = (
                from_edge_error(failure) if self.oauth.owns(request.rel_url.raw_path) else error_response(failure)
            )
        finally:
            route = _route_var.get()
            _route_var.reset(route_token)
            request_id_var.reset(token)
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = rid
            if self.drain.started:
                # Finished during the grace period: the client must not send another request here.
                response.force_close()
        elapsed = time.perf_counter() - start
        HTTP_REQUESTS.labels(request.method, route, str(response.status)).inc()
        HTTP_LATENCY.labels(request.method, route).observe(elapsed)
        log.log(
            # One line per request at INFO costs more than the translation itself under load.
            logging.WARNING if response.status >= 500 else logging.DEBUG,
            "%s %s %d",
            request.method,
            route,
            response.status,
            extra={"http_status": response.status, "duration_ms": round(elapsed * 1000, 2), "request_id": rid},
        )
        return response

    async def _traced(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The request under a SERVER span, continuing the client's traceparent; the backend calls are its children."""
        with tracing.incoming(request.method, request.headers) as span:
            response = await handler(request)
            span.update_name(f"{request.method} {_route_var.get()}")
            span.set_attribute("http.response.status_code", response.status)
            return response

    # ------------------------------------------------------------------------------- fixed routes

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        apis = sorted(self.table.backends())
        backends = await self.backends.check(apis, self.settings.readiness_timeout)
        ready = all(b["status"] == "SERVING" for b in backends.values())
        return json_response(
            {"status": "ready" if ready else "unavailable", "backends": backends}, 200 if ready else 503
        )

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        if self._openapi is None:
            self._openapi = dumps(build_openapi(self.table))
        return web.Response(body=self._openapi, content_type="application/json", charset="utf-8")

    async def advertisement(self, request: web.Request) -> web.StreamResponse:
        if self._advertisement is None:
            self._advertisement = dumps(advertisement.advertisement_schema())
        return web.Response(body=self._advertisement, content_type="application/schema+json", charset="utf-8")

    # ------------------------------------------------------------------------------- transcoding

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        if self.oauth.owns(raw_path):
            _route_var.set(raw_path)
            return await self.oauth.handle(request)
        if self.a2a.owns(raw_path):
            _route_var.set(self.a2a.label(raw_path))
            return await self.a2a.handle(request)
        if self.mcp.owns(raw_path):
            _route_var.set(raw_path)
            return await self.mcp.handle(request)
        if self.console.owns(raw_path):
            _route_var.set(self.console.label(raw_path))
            return await self.console.handle(request)
        # A console session's cookie stands for its credential on the REST API (with CSRF checks).
        request = await self.console.authorize(request)
        fixed = self._fixed.get(raw_path)
        if fixed is not None:
            _route_var.set(raw_path)
            if request.method != "GET":
                raise errors.method_not_allowed(request.method, ["GET"])
            return await fixed(request)
        try:
            found = self.table.match(request.method, raw_path)
        except UnicodeDecodeError:
            raise errors.bad_request("", "the URL path is not valid percent-encoded UTF-8") from None
        if found is None:
            raise errors.not_found(raw_path)
        if isinstance(found, list):
            raise errors.method_not_allowed(request.method, found)
        route = found.route
        _route_var.set(route.template.source)
        if route.client_streaming:
            return await self._bidi(request, route)

        raw_body = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout)
        body = parse_body(request, route, raw_body)
        try:
            query = parse_qsl(
                request.rel_url.raw_query_string,
                keep_blank_values=True,
                encoding="utf-8",
                errors="strict",
                max_num_fields=MAX_QUERY_FIELDS,
            )
        except ValueError:  # UnicodeDecodeError included
            raise errors.bad_request("", "the query string is malformed or has too many parameters") from None
        last_event = request.headers.get("Last-Event-ID")
        if last_event is not None and route.sse_resume and all(k != RESUME_REQUEST_FIELD for k, _ in query):
            # An EventSource reconnecting: it resumes after the last event it received (the query, if it says
            # otherwise, wins). Checked like the query parameter it stands for.
            query.append((RESUME_REQUEST_FIELD, last_event))
        try:
            msg = build_request(
                route.request_class, route.body, HttpRequestParts(request.method, found.bindings, query, body)
            )
        except FieldError as exc:
            raise errors.bad_request(exc.field, exc.description) from None
        metadata = forwarded_metadata(request, raw_body, self.settings.max_forwarded_header_bytes)
        if route.server_streaming:
            return await self._stream(request, route, msg, metadata)
        try:
            reply = await self.backends.unary(route)(msg, timeout=self.settings.call_timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc, route.service.full_name) from None
        return json_response(response_to_json(reply, route.response_body))

    # ------------------------------------------------------------------------------- streaming

    async def _stream(
        self, request: web.Request, route: Route, msg: message.Message, metadata: list[tuple[str, str | bytes]]
    ) -> web.StreamResponse:
        """A server-streaming RPC as Server-Sent Events, or as a WebSocket when the client asks to upgrade."""
        # No deadline: a watch is meant to stay open; it ends when either side goes away.
        call = self.backends.server_stream(route)(msg, metadata=metadata)
        pending: asyncio.Future[Any] = asyncio.ensure_future(call.read())
        try:
            # Wait a little for the first message, so that a call failing at once (not found, permission
            # denied) is answered with its real HTTP status; a quiet stream starts anyway after that.
            await asyncio.wait({pending}, timeout=min(self.settings.stream_heartbeat, FIRST_MESSAGE_WAIT))
            failed = pending.exception() if pending.done() else None
            if isinstance(failed, grpc.aio.AioRpcError):
                raise errors.from_rpc_error(failed, route.service.full_name)
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request, route, call, pending)
            return await self._sse(request, route, call, pending)
        finally:
            call.cancel()

    def _event(self, route: Route, item: Any) -> bytes:
        return dumps(response_to_json(item, route.response_body))

    async def _sse(
        self, request: web.Request, route: Route, call: Any, pending: asyncio.Future[Any]
    ) -> web.StreamResponse:
        """`pending` is the read of the next message, possibly already done."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                REQUEST_ID_HEADER: request_id_var.get(),
            }
        )
        await response.prepare(request)
        closing = asyncio.ensure_future(self.drain.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {pending, closing}, timeout=self.settings.stream_heartbeat, return_when=asyncio.FIRST_COMPLETED
                )
                if closing in done:
                    # The edge is shutting down: a last event saying so, and when to reconnect (elsewhere).
                    failure = errors.shutting_down()
                    await response.write(
                        f"retry: {SSE_RETRY_MS}\nevent: close\ndata: ".encode() + dumps(failure.body()) + b"\n\n"
                    )
                    break
                if not done:
                    # A comment line keeps proxies from timing out a quiet stream, and writing it is how a
                    # client that went away is noticed (aiohttp does not cancel the handler).
                    await response.write(b": keepalive\n\n")
                    continue
                item = pending.result()
                if item is grpc.aio.EOF:
                    break
                event_id = f"id: {getattr(item, RESUME_EVENT_FIELD)}\n".encode() if route.sse_resume else b""
                await response.write(event_id + b"data: " + self._event(route, item) + b"\n\n")
                pending = asyncio.ensure_future(call.read())
        except grpc.aio.AioRpcError as exc:
            failure = errors.from_rpc_error(exc, route.service.full_name)
            with contextlib.suppress(ConnectionError):
                await response.write(b"event: error\ndata: " + dumps(failure.body()) + b"\n\n")
        except ConnectionError:
            return response  # the client went away; the caller cancels the call
        finally:
            pending.cancel()
            closing.cancel()
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def _websocket(
        self, request: web.Request, route: Route, call: Any, pending: asyncio.Future[Any]
    ) -> web.StreamResponse:
        """Each message one JSON text frame; a failure sends the error body, then closes with 1011."""
        ws = await self._upgrade(request, web.WebSocketResponse(heartbeat=WS_HEARTBEAT))

        async def pump() -> None:
            nonlocal pending
            try:
                while (item := await pending) is not grpc.aio.EOF:
                    await ws.send_str(self._event(route, item).decode("utf-8"))
                    pending = asyncio.ensure_future(call.read())
            except grpc.aio.AioRpcError as exc:
                await _close_failed(ws, errors.from_rpc_error(exc, route.service.full_name), WSCloseCode.INTERNAL_ERROR)
                return
            await ws.close()

        async def drain() -> None:
            # Client frames are ignored (server streaming takes one request); this notices the client closing.
            async for frame in ws:
                if frame.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break

        tasks = (asyncio.create_task(pump()), asyncio.create_task(drain()), asyncio.create_task(self._going_away(ws)))
        try:
            await _until_first_ends(tasks)
        finally:
            pending.cancel()
            if not ws.closed:
                await ws.close()
        return ws

    async def _upgrade(self, request: web.Request, ws: web.WebSocketResponse) -> web.WebSocketResponse:
        if not ws.can_prepare(request).ok:
            raise errors.bad_request("", "invalid WebSocket upgrade request")
        ws.headers[REQUEST_ID_HEADER] = request_id_var.get()
        await ws.prepare(request)
        return ws

    async def _going_away(self, ws: web.WebSocketResponse) -> None:
        await self.drain.wait()
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the edge is shutting down")

    async def _bidi(self, request: web.Request, route: Route) -> web.StreamResponse:
        """A client- or bidirectional-streaming RPC, as a WebSocket only (a plain GET is told to upgrade: 426).

        Each text frame from the client is one request message, a JSON object read as a request body is (strict,
        at most max_body_bytes); an empty frame ends the requests (a gRPC half-close) while answers keep coming.
        Each answer is one JSON text frame. A frame that is not a valid request ends the conversation: an error
        frame in the edge's error shape, then close 1007 (1003 for a binary frame, 1008 for a request after the
        empty frame; aiohttp itself closes 1009 on a frame over the bound, 1007 on invalid UTF-8). The call's end
        closes the socket: 1000 when OK, else an error frame and 1011 with the gRPC status name as the reason, as
        for server streams. The client closing cancels the call; the edge shutting down closes 1001.

        Backpressure: the next frame is read only once the previous request was written to the call, and the next
        answer read only once the previous one was sent, so neither side is buffered beyond a frame or two.
        """
        if request.headers.get("Upgrade", "").lower() != "websocket":
            failure = errors.bad_request(
                "",
                f"{route.template.source} is a WebSocket (one JSON request per text frame): send the GET with "
                "`Connection: Upgrade` and `Upgrade: websocket`",
                http_status=426,
            )
            failure.headers["Upgrade"] = "websocket"
            raise failure
        if request.rel_url.raw_query_string:
            raise errors.bad_request(
                "", f"{route.template.source} takes its requests as WebSocket frames, not in the query string"
            )
        metadata = forwarded_metadata(request, b"", self.settings.max_forwarded_header_bytes)
        # A frame over the bound is refused by aiohttp as it arrives (1009), never read whole into memory.
        ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT, max_msg_size=self.settings.max_body_bytes)
        await self._upgrade(request, ws)
        # No deadline, as for a server stream: a conversation lasts as long as both sides want it.
        call = self.backends.bidi_stream(route)(metadata=metadata)
        answers = asyncio.create_task(self._bidi_answers(ws, route, call))
        requests = asyncio.create_task(self._bidi_requests(ws, route, call))
        going_away = asyncio.create_task(self.drain.wait())
        try:
            await _until_first_ends((answers, requests, going_away))
        finally:
            call.cancel()
        # Closed here, by the one task, once nothing reads the socket: a close from another task while one waits
        # in receive() would drop the connection without the closing handshake.
        ending: _Ending | None = None
        if answers.done() and not answers.cancelled() and answers.exception() is None:
            ending = answers.result()
        elif requests.done() and not requests.cancelled() and requests.exception() is None:
            ending = requests.result()
        elif going_away.done() and not going_away.cancelled():
            ending = _Ending(WSCloseCode.GOING_AWAY, reason=b"the edge is shutting down")
        if not ws.closed:
            if ending is None:
                await ws.close()
            elif ending.failure is not None:
                await _close_failed(ws, ending.failure, ending.code)
            else:
                await ws.close(code=ending.code, message=ending.reason)
        return ws

    async def _bidi_answers(self, ws: web.WebSocketResponse, route: Route, call: Any) -> _Ending:
        try:
            while (item := await call.read()) is not grpc.aio.EOF:
                await ws.send_str(self._event(route, item).decode("utf-8"))
        except grpc.aio.AioRpcError as exc:
            return _Ending(WSCloseCode.INTERNAL_ERROR, errors.from_rpc_error(exc, route.service.full_name))
        return _Ending(WSCloseCode.OK)

    async def _bidi_requests(self, ws: web.WebSocketResponse, route: Route, call: Any) -> _Ending | None:
        """Writes each frame's request to the call; how the socket must close, or None when the client closed it."""
        half_closed = False
        while True:
            frame = await ws.receive()
            if frame.type is WSMsgType.BINARY:
                failure = errors.bad_request("", "send each request as a JSON text frame, not a binary one")
                return _Ending(WSCloseCode.UNSUPPORTED_DATA, failure)
            if frame.type is not WSMsgType.TEXT:
                return None  # closed by the client (CLOSE), or by aiohttp on a protocol error (ERROR)
            if call.done():
                continue  # the call has ended: the answer task has its status
            if half_closed:
                failure = errors.bad_request("", "no request may follow the empty frame that ended the requests")
                return _Ending(WSCloseCode.POLICY_VIOLATION, failure)
            if not frame.data.strip():
                half_closed = True
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.done_writing()
                continue
            request = route.request_class()
            try:
                json_to_message(parse_json(frame.data), request)
            except FieldError as exc:
                return _Ending(WSCloseCode.INVALID_TEXT, errors.bad_request(exc.field, exc.description))
            except errors.EdgeError as failure:
                return _Ending(WSCloseCode.INVALID_TEXT, failure)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # Refused only when the call has just ended; the answer task has its status.
                await call.write(request)


@dataclass(frozen=True)
class _Ending:
    """How a bidirectional WebSocket closes: its code, and the error frame sent before, if any."""

    code: int
    failure: errors.EdgeError | None = None
    reason: bytes = b""


async def _close_failed(ws: web.WebSocketResponse, failure: errors.EdgeError, code: int) -> None:
    """An error frame in the edge's error shape, then the close: its reason is the gRPC status name."""
    with contextlib.suppress(ConnectionError):
        await ws.send_str(dumps(failure.body()).decode("utf-8"))
    await ws.close(code=code, message=failure.grpc_code.name.encode())


async def _close_backends(app: web.Application) -> None:
    await app[EDGE_KEY].backends.close()


def create_app(settings: EdgeSettings, services: Sequence[ServiceDescriptor] | None = None) -> web.Application:
    """The edge application; `services` defaults to every generated agentvault.<api>.v1 service."""
    table = build_routes(discover_services() if services is None else services)
    missing = sorted({route.api for route in table.routes} - set(settings.backends))
    if missing:
        raise SettingsError(f"no backend address for API(s) {', '.join(missing)}: set <API>_ADDR")
    edge = Edge(settings, table)
    app = web.Application(middlewares=[edge.middleware])
    app[EDGE_KEY] = edge
    app[DRAIN_KEY] = edge.drain
    app.router.add_route("*", "/{tail:.*}", edge.handle)
    app.on_startup.append(edge.mcp.start)
    app.on_cleanup.append(edge.mcp.stop)
    app.on_cleanup.append(edge.console.close)
    app.on_cleanup.append(_close_backends)
    for route in table.routes:
        log.debug("route %s %s -> %s", route.http_method, route.template.source, route.grpc_path)
    return app


async def _until_first_ends(tasks: tuple[asyncio.Task[Any], ...]) -> None:
    """Waits until one of a WebSocket's tasks ends (the client, the call, or shutdown), then ends the others."""
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
