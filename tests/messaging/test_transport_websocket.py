"""The WebSocket transport against a real aiohttp WebSocket agent on loopback: one shared connection per endpoint,
acks, replies and nacks, drops and reconnects, deadlines and oversize frames."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import json_format

from agentvault.common import agent_auth, egress
from agentvault.common import agents as rules
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault_messaging.transports.base import DELIVERED, DeliveryError, Outbound, TransportContext
from agentvault_messaging.transports.websocket import WebSocketTransport

from ..loopback import serve

REPLY = {"parts": [{"text": "pong"}], "correlation_id": "corr-1"}
LIMIT = 64 * 1024


@dataclass
class Agent:
    """Does what each message's text says: ack, reply, nack, drop, abort, silent, huge; counts its handshakes."""

    port: int = 0
    handshakes: int = 0
    open_sockets: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    # Holds the answer to "ack-later" messages, so concurrent deliveries really overlap.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    later: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        self.handshakes += 1
        self.headers.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.open_sockets += 1
        try:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(frame.data)
                assert data["type"] == "message"
                self.received.append(data["message"])
                message_id, text = data["message"]["id"], data["message"]["parts"][0]["text"]
                if text == "ack":
                    await ws.send_json({"type": "ack", "id": message_id})
                elif text == "ack-later":
                    # Answered later, off the read loop: the next messages keep arriving meanwhile.
                    self.later.add(asyncio.create_task(self._ack_later(ws, message_id)))
                elif text == "reply":
                    # Noise first: unknown frames and an ack for another id are ignored.
                    await ws.send_json({"type": "hello", "id": message_id})
                    await ws.send_str("not json")
                    await ws.send_json({"type": "ack", "id": str(uuid.uuid4())})
                    await ws.send_json({"type": "ack", "id": message_id, "reply": REPLY})
                elif text == "nack":
                    await ws.send_json(
                        {"type": "nack", "id": message_id, "reason": "no such\nskill", "permanent": True}
                    )
                elif text == "nack-later":
                    await ws.send_json({"type": "nack", "id": message_id, "reason": "busy", "permanent": False})
                elif text == "drop":
                    await ws.close()
                elif text == "abort":
                    assert request.transport is not None
                    request.transport.abort()
                    break
                elif text == "huge":
                    await ws.send_str("x" * (LIMIT + 1))
        finally:
            self.open_sockets -= 1
        return ws

    async def _ack_later(self, ws: web.WebSocketResponse, message_id: str) -> None:
        await self.release.wait()
        await ws.send_json({"type": "ack", "id": message_id})

    async def refuse(self, request: web.Request) -> web.Response:
        return web.Response(status=403)


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    found = Agent()
    app = web.Application()
    app.router.add_get("/ws", found.handle)
    app.router.add_get("/refuse", found.refuse)
    async with serve(app) as found.port:
        try:
            yield found
        finally:
            found.release.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with egress.guarded_session(False) as opened:
        yield opened


@pytest.fixture
async def transport() -> AsyncIterator[WebSocketTransport]:
    opened = WebSocketTransport()
    try:
        yield opened
    finally:
        await opened.close()


def context(session: aiohttp.ClientSession, **overrides: Any) -> TransportContext:
    fields: dict[str, Any] = {
        "session": session,
        "auth": agent_auth.NO_AUTH,
        "signing_secret": b"unused-here",
        "max_answer_bytes": LIMIT,
    }
    return TransportContext(**{**fields, **overrides})


def outbound(url: str, text: str, deadline: float = 5.0) -> Outbound:
    message = mpb.Message(
        id=str(uuid.uuid4()),
        sender=mpb.Party(agent_id="a-sender"),
        recipient=mpb.Party(agent_id="a-recipient"),
        parts=[mpb.Part(text=text)],
    )
    return Outbound(message=message, agent_id="a-recipient", endpoint=url, attempt=1, deadline=deadline)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_acked_deliveries_share_one_connection(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport
) -> None:
    first = outbound(agent.url(), "ack")
    outcome = await transport.deliver(first, context(session))
    assert outcome.status == DELIVERED and outcome.replies == () and outcome.reason == ""
    assert agent.received[0]["id"] == first.message.id and agent.received[0]["parts"] == [{"text": "ack"}]
    for _ in range(3):
        assert (await transport.deliver(outbound(agent.url(), "ack"), context(session))).status == DELIVERED
    assert agent.handshakes == 1


async def test_concurrent_deliveries_wait_on_one_connect(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport
) -> None:
    deliveries = [
        asyncio.create_task(transport.deliver(outbound(agent.url(), "ack-later"), context(session))) for _ in range(5)
    ]
    await until(lambda: len(agent.received) == 5)
    agent.release.set()
    outcomes = await asyncio.gather(*deliveries)
    assert [o.status for o in outcomes] == [DELIVERED] * 5
    assert agent.handshakes == 1


async def test_reply_frame_comes_back_and_noise_is_ignored(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport
) -> None:
    outcome = await transport.deliver(outbound(agent.url(), "reply"), context(session))
    assert outcome.status == DELIVERED and outcome.reason == ""
    assert list(outcome.replies) == [json_format.ParseDict(REPLY, mpb.Message())]
    # The noise did not cost the connection.
    assert (await transport.deliver(outbound(agent.url(), "ack"), context(session))).status == DELIVERED
    assert agent.handshakes == 1


@pytest.mark.parametrize(
    ("text", "permanent", "reason"), [("nack", True, "no such skill"), ("nack-later", False, "busy")]
)
async def test_nack_fails_the_delivery_as_the_agent_says(
    agent: Agent,
    session: aiohttp.ClientSession,
    transport: WebSocketTransport,
    text: str,
    permanent: bool,
    reason: str,
) -> None:
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver(outbound(agent.url(), text), context(session))
    assert caught.value.permanent is permanent
    assert caught.value.reason == f"agent refused: {reason}"


@pytest.mark.parametrize("how", ["drop", "abort"])
async def test_dropped_connection_fails_retryable_and_the_next_delivery_reconnects(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport, how: str
) -> None:
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver(outbound(agent.url(), how), context(session))
    assert not caught.value.permanent and "closed" in caught.value.reason
    outcome = await transport.deliver(outbound(agent.url(), "ack"), context(session))
    assert outcome.status == DELIVERED
    assert agent.handshakes == 2


async def test_no_ack_before_the_deadline_is_retryable(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport
) -> None:
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver(outbound(agent.url(), "silent", deadline=0.3), context(session))
    assert not caught.value.permanent and "0.3s" in caught.value.reason
    # The waiter went with the delivery; the connection stays for the next one.
    assert all(not c.waiters for c in transport._connections.values())
    assert (await transport.deliver(outbound(agent.url(), "ack"), context(session))).status == DELIVERED
    assert agent.handshakes == 1


async def test_oversize_frame_closes_the_connection(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport
) -> None:
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver(outbound(agent.url(), "huge"), context(session))
    assert not caught.value.permanent and "closed" in caught.value.reason
    assert (await transport.deliver(outbound(agent.url(), "ack"), context(session))).status == DELIVERED
    assert agent.handshakes == 2


async def test_agent_credentials_go_with_the_handshake(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport
) -> None:
    bearer = agent_auth.PreparedAuth(rules.AUTH_BEARER, "fp", {"Authorization": "Bearer the-token"})
    assert (await transport.deliver(outbound(agent.url(), "ack"), context(session, auth=bearer))).status == DELIVERED
    assert agent.headers[0]["Authorization"] == "Bearer the-token"


async def test_refused_handshake_is_permanent(
    agent: Agent, session: aiohttp.ClientSession, transport: WebSocketTransport
) -> None:
    with pytest.raises(DeliveryError) as caught:
        await transport.deliver(outbound(agent.url("/refuse"), "ack"), context(session))
    assert caught.value.permanent and "403" in caught.value.reason


async def test_close_closes_every_connection(agent: Agent, session: aiohttp.ClientSession) -> None:
    transport = WebSocketTransport()
    assert (await transport.deliver(outbound(agent.url(), "ack"), context(session))).status == DELIVERED
    assert agent.open_sockets == 1
    await transport.close()
    await until(lambda: agent.open_sockets == 0)
    with pytest.raises(DeliveryError):
        await transport.deliver(outbound(agent.url(), "ack"), context(session))
