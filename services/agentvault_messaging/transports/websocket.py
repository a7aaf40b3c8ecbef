"""Delivery over one lasting WebSocket per agent endpoint: a message frame out, the agent's ack or nack back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp

from agentvault.common import egress, tracing
from agentvault.common.errors import Unavailable

from .base import (
    DELIVERED,
    DeliveryError,
    Outbound,
    Outcome,
    TransportContext,
    message_json,
    parse_reply,
    retryable_status,
)

log = logging.getLogger(__name__)

SCHEMES = ("ws", "wss", "http", "https")
# Pings keep a quiet connection alive through proxies and find a dead one (no pong) without a delivery failing.
HEARTBEAT_SECONDS = 30.0
# A connection nothing used for this long is closed; the next delivery opens a new one.
IDLE_SECONDS = 300.0
MAX_NACK_REASON = 256


class _Lost(Exception):
    """The connection ended while a delivery waited for its ack."""


@dataclass(eq=False)
class _Connection:
    key: tuple[str, str]
    ws: aiohttp.ClientWebSocketResponse
    # Message id -> the deliveries waiting for its ack (one each; a list only if one id is delivered twice at once).
    waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    reader: asyncio.Task[None] | None = None
    lost: bool = False


class WebSocketTransport:
    """Keeps one WebSocket per endpoint (and per agent credentials: two agents sharing a URL never share a
    connection authenticated as one of them), opened on the first delivery and again after it drops."""

    name: ClassVar[str] = "websocket"
    protocols: ClassVar[tuple[str, ...]] = ("websocket",)
    priority: ClassVar[int] = 20

    def __init__(self) -> None:
        self._connections: dict[tuple[str, str], _Connection] = {}
        # One connect in flight per key; concurrent deliveries wait on it.
        self._connecting: dict[tuple[str, str], asyncio.Task[_Connection]] = {}
        self._closed = False

    async def deliver(self, item: Outbound, context: TransportContext) -> Outcome:
        if urlsplit(item.endpoint).scheme not in SCHEMES:
            raise DeliveryError("the endpoint URL must be ws or wss", permanent=True)
        try:
            egress.check_url(item.endpoint, context.block_private)
        except egress.EgressRefused as exc:
            raise DeliveryError(f"endpoint refused: {exc}", permanent=True) from None
        document: dict[str, Any] = {"type": "message", "message": message_json(item.message)}
        # One connection carries many deliveries: each frame names its own delivery span (when spans are recorded).
        traceparent = tracing.current_headers().get("traceparent")
        if traceparent:
            document["traceparent"] = traceparent
        frame = json.dumps(document, separators=(",", ":"))
        try:
            async with asyncio.timeout(item.deadline):
                connection = await self._connection(item, context)
                answer = await self._exchange(connection, item.message.id, frame)
        except TimeoutError:
            raise DeliveryError(f"no ack within {item.deadline:g}s") from None
        return _outcome(answer)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        # Together: each close waits for the agent's close frame (bounded by aiohttp's close timeout).
        await asyncio.gather(*(self._discard(c) for c in list(self._connections.values())))
        self._connecting.clear()

    # ------------------------------------------------------------------------------------------ connections

    async def _connection(self, item: Outbound, context: TransportContext) -> _Connection:
        if self._closed:
            raise DeliveryError("the transport is closed")
        key = (item.endpoint, context.auth.fingerprint)
        connection = self._connections.get(key)
        if connection is not None and not connection.lost and not connection.ws.closed:
            connection.last_used = time.monotonic()
            return connection
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.create_task(self._connect(key, item.endpoint, item.deadline, context))
            self._connecting[key] = task
            task.add_done_callback(self._connected)
        # Shielded: one delivery giving up (its deadline) must not cancel the connect the others wait on.
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise DeliveryError("the transport is closed") from None  # close() stopped the connect
            raise

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        for key, connecting in list(self._connecting.items()):
            if connecting is task:
                del self._connecting[key]
        if not task.cancelled():
            # Retrieved here too: every delivery that waited on it may have given up already.
            task.exception()

    async def _connect(self, key: tuple[str, str], url: str, deadline: float, context: TransportContext) -> _Connection:
        try:
            # The handshake is bounded by the deadline of the delivery that started it.
            async with asyncio.timeout(deadline):
                headers, _ = await context.auth.request_headers()
                ws = await context.session.ws_connect(
                    url,
                    headers=headers,
                    ssl=context.auth.ssl_context if context.auth.ssl_context is not None else True,
                    max_msg_size=max(context.max_answer_bytes, 1),  # 0 would mean unbounded to aiohttp
                    heartbeat=HEARTBEAT_SECONDS,
                    autoclose=True,
                    autoping=True,
                )
        except TimeoutError:
            raise DeliveryError(f"no WebSocket handshake within {deadline:g}s") from None
        except aiohttp.WSServerHandshakeError as exc:
            # The agent's HTTP answer to the upgrade: its server failing or busy is worth retrying, a refusal not.
            retryable = retryable_status(exc.status)
            raise DeliveryError(f"WebSocket handshake refused: HTTP {exc.status}", permanent=not retryable) from None
        except egress.EgressRefused as exc:
            raise DeliveryError(f"endpoint refused: {exc}", permanent=True) from None
        except Unavailable as exc:
            raise DeliveryError(f"auth: {exc.message[:200]}") from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError):
            raise DeliveryError("TLS handshake with the agent failed") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"cannot connect to the agent: {type(exc).__name__}") from None
        connection = _Connection(key, ws)
        if self._closed:
            await ws.close()
            raise DeliveryError("the transport is closed")
        connection.reader = asyncio.create_task(self._read(connection))
        self._connections[key] = connection
        return connection

    async def _discard(self, connection: _Connection) -> None:
        connection.lost = True
        if self._connections.get(connection.key) is connection:
            del self._connections[connection.key]
        for waiters in connection.waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(_Lost())
        current = asyncio.current_task()
        if connection.reader is not None and connection.reader is not current:
            connection.reader.cancel()
        with contextlib.suppress(Exception):
            await connection.ws.close()

    async def _read(self, connection: _Connection) -> None:
        ws = connection.ws
        try:
            while True:
                try:
                    message = await ws.receive(timeout=IDLE_SECONDS)
                except TimeoutError:
                    if not connection.waiters and time.monotonic() - connection.last_used >= IDLE_SECONDS:
                        log.debug("closing an idle agent WebSocket")
                        return
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._on_frame(connection, message.data)
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    return
                elif message.type == aiohttp.WSMsgType.ERROR:
                    # Includes a frame above max_answer_bytes: aiohttp refuses it and closes the connection.
                    log.info("agent WebSocket failed: %s", type(message.data).__name__)
                    return
                else:
                    log.debug("ignoring a %s frame from an agent", message.type.name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reading an agent WebSocket failed")
        finally:
            if not connection.lost:
                await self._discard(connection)

    def _on_frame(self, connection: _Connection, data: str) -> None:
        try:
            frame = json.loads(data)
        except (ValueError, RecursionError):
            log.debug("ignoring a frame from an agent that is not JSON")
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        message_id = frame.get("id") if isinstance(frame, dict) else None
        if kind not in ("ack", "nack") or not isinstance(message_id, str):
            log.debug("ignoring an unknown frame from an agent")
            return
        waiters = connection.waiters.get(message_id)
        if not waiters:
            log.debug("ignoring an ack or nack for no delivery in flight")
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(frame)

    async def _exchange(self, connection: _Connection, message_id: str, frame: str) -> dict[str, Any]:
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        connection.waiters.setdefault(message_id, []).append(waiter)
        connection.last_used = time.monotonic()
        try:
            try:
                await connection.ws.send_str(frame)
            except (aiohttp.ClientError, OSError, RuntimeError):
                await self._discard(connection)
                raise DeliveryError("the agent's WebSocket closed while sending") from None
            try:
                return await waiter
            except _Lost:
                raise DeliveryError("the agent's WebSocket closed before its ack") from None
        finally:
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # a loss seen while sending: already reported above
            waiters = connection.waiters.get(message_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                connection.waiters.pop(message_id, None)
            connection.last_used = time.monotonic()


def _outcome(frame: dict[str, Any]) -> Outcome:
    if frame.get("type") == "nack":
        reason = frame.get("reason")
        text = reason if isinstance(reason, str) else ""
        # The agent's own reason, meant for the sender; bounded and without control characters.
        text = "".join(c if c.isprintable() else " " for c in text[:MAX_NACK_REASON]).strip()
        raise DeliveryError(f"agent refused: {text or 'no reason given'}", permanent=frame.get("permanent") is True)
    raw = frame.get("reply")
    if raw is None:
        return Outcome(DELIVERED)
    reply, problem = parse_reply(raw)
    return Outcome(DELIVERED, reason=problem, replies=(reply,) if reply is not None else ())


TRANSPORT = WebSocketTransport
