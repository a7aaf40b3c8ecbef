"""The edge's HTTP server: per-connection time and count bounds, parser errors as JSON, and graceful draining."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from agentvault_edge import errors
from agentvault_edge.json_out import dumps
from agentvault_edge.settings import EdgeSettings

log = logging.getLogger(__name__)

# aiohttp's own limits on the request head, applied by its parser before any handler runs.
MAX_LINE_BYTES = 8190
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 100
# What is left in flight after the grace period is cancelled; this is how long cancelling may take.
CANCEL_WAIT = 0.5
DRAIN_POLL = 0.05
# How long a connection answered with a 408 mid-head is half-closed, its input discarded, before it is closed.
LINGER_SECONDS = 2.0


class Drain:
    """Set once when the edge starts shutting down: new requests are refused and streams told to close."""

    def __init__(self) -> None:
        self.started = False
        self._event = asyncio.Event()

    def begin(self) -> None:
        self.started = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


DRAIN_KEY: web.AppKey[Drain] = web.AppKey("edge_drain", Drain)


def _raw_response(err: errors.EdgeError) -> bytes:
    """A whole HTTP/1.1 response, for answering from the protocol where no request object exists."""
    body = dumps(err.body())
    reason = {408: "Request Timeout"}.get(err.http_status, "Error")
    head = (
        f"HTTP/1.1 {err.http_status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection protocol plus a bound on the time to send a request head.

    aiohttp bounds an idle keep-alive connection (keepalive_timeout) but not a client that trickles a head
    byte by byte: here every head (the first on a new connection, or the next once its first byte arrives)
    must be complete within `header_timeout`, else 408 and close. Body time is bounded by the handler.
    """

    def __init__(self, manager: EdgeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = manager.settings.header_timeout
        self._max_connections = manager.settings.max_connections
        self._edge_server = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False
        self._lingering: asyncio.TimerHandle | None = None
        self._counted = False
        # A request is between its handler starting and its response written: closing now would cut it.
        self.busy = False
        self.over_limit = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._counted = True
        self._edge_server.open_connections += 1
        self.over_limit = self._edge_server.open_connections > self._max_connections
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._lingering is not None:
            self._lingering.cancel()
        if self._counted:
            self._counted = False
            self._edge_server.open_connections -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            return  # answered and half-closed: the rest of this head is read only to be dropped
        if not self.busy and data:
            self._head_bytes = True
            if self._head_timer is None:
                self._arm_head_timer()
        super().data_received(data)
        if not self.busy and getattr(self, "_messages", None):
            # A whole head is parsed and queued for the handler: from here on closing would drop a request.
            self.request_started()

    def request_started(self) -> None:
        self.busy = True
        self._head_bytes = False
        self._cancel_head_timer()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self.busy = False

    def _process_keepalive(self) -> None:
        if self._head_bytes and self._head_timer is not None:
            # A head is arriving: it is the head bound's to end (with a 408), not the idle bound's (silently).
            self._keepalive_handle = None
            return
        super()._process_keepalive()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.busy or self.transport is None:
            return
        log.debug("closing a connection that did not send a request head within %ss", self._header_timeout)
        if self._head_bytes and self.transport.can_write_eof():
            # A partial head gets an answer. Closing at once while the client still sends would make the kernel
            # reset the connection, and a reset can destroy the answer before the client reads it: so send it,
            # half-close, discard what still arrives for a moment, then close (a lingering close).
            self.transport.write(_raw_response(errors.header_timeout(self._header_timeout)))
            self.transport.write_eof()
            self._lingering = self._loop.call_later(LINGER_SECONDS, self.force_close)
            return
        # A connection that never sent a byte is simply closed.
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused, in the edge's JSON error shape.

        The parser's message quotes the offending line (possibly a credential), so it is neither returned
        nor logged; its class is enough to tell what was wrong.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        err: errors.EdgeError
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
            err = errors.headers_too_large(
                f"the request line or a header is longer than {MAX_FIELD_BYTES} bytes, or there are more than "
                f"{MAX_HEADERS} headers"
            )
        elif status < 500:
            err = errors.bad_request("", "malformed HTTP request", http_status=status)
        else:
            log.error("error handling a request", exc_info=exc)
            err = errors.internal("-")
        log.debug("refused a malformed request: %s", type(exc).__name__ if exc else status)
        resp = web.Response(body=dumps(err.body()), status=err.http_status, content_type="application/json")
        resp.force_close()
        return resp


class EdgeServer(web.Server):
    """aiohttp's low-level server, making EdgeRequestHandler connections and counting them."""

    def __init__(self, handler: Any, *, settings: EdgeSettings, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.settings = settings
        self.open_connections = 0

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """Runs the edge application with the connection bounds of `settings`; see `shutdown_gracefully`."""

    def __init__(self, app: web.Application, settings: EdgeSettings) -> None:
        super().__init__(
            app,
            access_log=None,
            shutdown_timeout=CANCEL_WAIT,
            keepalive_timeout=settings.keepalive_timeout,
            # After an early answer (404, 413, 408) aiohttp reads and drops the rest of the body for a while
            # so that the client sees the answer; no longer than a body may take.
            lingering_time=min(10.0, settings.body_timeout),
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADERS,
        )
        self.settings = settings

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return EdgeServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            settings=self.settings,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )

    async def shutdown_gracefully(self, grace: float) -> None:
        """Stops accepting, lets requests in flight finish within `grace`, then closes everything.

        Idle keep-alive connections are closed between requests; one finishing a response during the grace
        answers with `Connection: close`; SSE streams get a final `close` event and WebSockets close 1001.
        """
        loop = asyncio.get_running_loop()
        for site in list(self.sites):
            await site.stop()
        self.app[DRAIN_KEY].begin()
        deadline = loop.time() + grace
        server = self.server
        while server is not None:
            busy = False
            for conn in server.connections:
                if isinstance(conn, EdgeRequestHandler) and conn.busy:
                    busy = True
                else:
                    conn.force_close()
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL)
        # Whatever is still running after the grace is cancelled here.
        await self.cleanup()
