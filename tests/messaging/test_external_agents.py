"""External agents end to end, real processes: a local agent's messages pushed through the mesh to an HTTP webhook
(Standard Webhooks, verified with the standard's own library) and to a WebSocket agent, replies, retries and dead
letters."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from agentvault.common.settings import Env
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_messaging.settings import MessagingSettings

from ..conftest import eventually
from ..loopback import serve
from .conftest import LocalAgent, Net, local_agent, text_message

pytestmark = pytest.mark.usefixtures("policies")

REPLY = {"parts": [{"text": "pong"}], "headers": {"x-answer": "1"}}


@dataclass
class Hooks:
    """Webhook agents on one loopback server; what each path answers is in `handle`. Every request's signature is
    checked with the agent's secret, as the mesh derives it."""

    secret_of: Callable[[str], str]
    port: int = 0
    # Path -> the verified body of every POST, in order.
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    headers: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    raw: dict[str, list[bytes]] = field(default_factory=dict)
    agents: dict[str, str] = field(default_factory=dict)  # path -> the agent registered there
    failures_left: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        body = await request.read()
        headers = dict(request.headers)
        # The standard's verification: a wrong secret, a changed byte or a stale timestamp raises (the server
        # then answers 500, which the mesh retries, and the test's own assertions fail).
        verified: dict[str, Any] = Webhook(self.secret_of(self.agents[path])).verify(body, headers)
        self.received.setdefault(path, []).append(verified)
        self.headers.setdefault(path, []).append(headers)
        self.raw.setdefault(path, []).append(body)
        kind = path.strip("/").split("-")[0]
        if kind == "reply":
            return web.json_response({"reply": REPLY})
        if kind == "flaky" and self.failures_left.get(path, 0) > 0:
            self.failures_left[path] -= 1
            return web.Response(status=503)
        if kind == "refuse":
            return web.json_response({"error": "the agent's own words"}, status=400)
        if kind == "broken":
            return web.Response(status=500)
        return web.Response(status=204)


@pytest.fixture(scope="module")
def signing_secret(net: Net) -> Callable[[str], str]:
    """An agent's Standard Webhooks secret ("whsec_..."), derived as the messaging service derives it: from its
    MESSAGING_WEBHOOK_KEY, unset here, so from its own SERVICE_CLIENT_SECRET, which the test learns from the mesh's
    environment (the dev mesh keeps every service's secret in SERVICE_CLIENT_SECRETS); the test compares it with what
    GetWebhookSecret tells the owner."""
    spec = net.mesh.mesh.spec("messaging")
    settings = MessagingSettings.load(Env(net.mesh.mesh.service_env(spec)))
    assert not net.mesh.env.get("MESSAGING_WEBHOOK_KEY")

    def secret(agent_id: str) -> str:
        return "whsec_" + base64.b64encode(settings.signing_secret(agent_id)).decode()

    return secret


@pytest.fixture(scope="module")
async def hooks(signing_secret: Callable[[str], str]) -> AsyncIterator[Hooks]:
    found = Hooks(signing_secret)
    app = web.Application()
    app.router.add_post("/{name}", found.handle)
    async with serve(app) as found.port:
        yield found


async def webhook_agent(net: Net, hooks: Hooks, path: str) -> LocalAgent:
    agent = await local_agent(net, endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=hooks.url(path))])
    hooks.agents[path] = agent.id
    return agent


async def send(net: Net, sender: LocalAgent, to: LocalAgent, text: str, **fields: Any) -> mpb.Message:
    sent = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(to, text, **fields)), metadata=sender.md
    )
    return sent.message


async def status_of(net: Net, who: LocalAgent, message_id: str, expected: str, seconds: float = 15) -> mpb.Message:
    """The message once its status is `expected` (polled)."""
    found: list[mpb.Message] = []

    async def check() -> None:
        m = await net.messaging.GetMessage(mpb.GetMessageRequest(id=message_id), metadata=who.md)
        assert m.status == expected, (m.status, m.status_reason, m.attempts)
        found.append(m)

    await eventually(check, seconds)
    return found[-1]


async def test_a_webhook_gets_the_signed_message_and_its_reply_comes_back(net: Net, hooks: Hooks) -> None:
    alice = await local_agent(net)
    hook = await webhook_agent(net, hooks, "/reply-1")
    m = await send(net, alice, hook, "ping", headers={"x-trace": "t1"})
    assert (m.transport, m.status) == ("http", "accepted")

    delivered = await status_of(net, alice, m.id, "delivered")
    assert delivered.attempts == 1
    [body] = hooks.received["/reply-1"]
    [headers] = hooks.headers["/reply-1"]
    assert headers["webhook-id"] == m.id and headers["webhook-signature"].startswith("v1,")
    assert body["id"] == m.id and body["parts"] == [{"text": "ping"}] and body["headers"] == {"x-trace": "t1"}
    assert body["sender"]["agent_id"] == alice.id and body["sender"]["kind"] == "agent"
    assert body["recipient"]["agent_id"] == hook.id
    assert (body["correlation_id"], body["conversation_id"]) == (m.correlation_id, m.conversation_id)
    # Another agent's secret does not verify it: the secret is the recipient's own.
    with pytest.raises(WebhookVerificationError):
        Webhook(hooks.secret_of(alice.id)).verify(hooks.raw["/reply-1"][0], headers)
    # The agent's owner learns the secret from the mesh (as a real webhook agent would) and it verifies the request;
    # an agent's own credential may not read it.
    told = await net.messaging.GetWebhookSecret(mpb.GetWebhookSecretRequest(agent_id=hook.id), metadata=net.admin)
    assert told.secret == hooks.secret_of(hook.id) and told.secret.startswith("whsec_")
    Webhook(told.secret).verify(hooks.raw["/reply-1"][0], headers)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await net.messaging.GetWebhookSecret(mpb.GetWebhookSecretRequest(agent_id=hook.id), metadata=alice.md)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    answer = await net.messaging.AwaitReply(mpb.AwaitReplyRequest(id=m.id, wait_seconds=15), metadata=alice.md)
    reply = answer.reply
    assert reply.parts[0].text == "pong" and reply.headers["x-answer"] == "1"
    assert (reply.in_reply_to, reply.correlation_id, reply.conversation_id) == (
        m.id,
        m.correlation_id,
        m.conversation_id,
    )
    assert reply.sender.agent_id == hook.id and reply.sender.kind == "agent"
    assert reply.recipient.agent_id == alice.id  # the original's sender, though the reply named no recipient
    # It came through alice's inbox; AwaitReply took it from there.
    listed = await net.messaging.ListMessages(
        mpb.ListMessagesRequest(correlation_id=m.correlation_id, agent_id=hook.id), metadata=alice.md
    )
    assert [(x.id, x.status) for x in listed.messages] == [(reply.id, "acknowledged"), (m.id, "delivered")]


async def test_a_private_webhook_agent_is_delivered_to(net: Net, hooks: Hooks) -> None:
    """A private agent is seen only by its owner and admins, and by the mesh services that call agents
    (agents:connect): the delivery worker reads its registration with the service's own identity."""
    private = await local_agent(
        net, endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=hooks.url("/private-1"))], sharing=pb.SHARING_PRIVATE
    )
    hooks.agents["/private-1"] = private.id
    sent = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(private, "for your eyes")), metadata=net.admin
    )
    await status_of(net, private, sent.message.id, "delivered")
    assert [b["parts"][0]["text"] for b in hooks.received["/private-1"]] == ["for your eyes"]


async def test_an_agent_lists_the_messages_it_sent(net: Net, hooks: Hooks) -> None:
    alice = await local_agent(net)
    hook = await webhook_agent(net, hooks, "/ok-listed")
    m = await send(net, alice, hook, "mine")
    # What it sent, not only what came to its inbox (Store.page's viewer filter matches sender_inbox).
    listed = await net.messaging.ListMessages(
        mpb.ListMessagesRequest(correlation_id=m.correlation_id), metadata=alice.md
    )
    assert [x.id for x in listed.messages] == [m.id]


async def test_a_busy_webhook_is_retried_until_it_takes_the_message(net: Net, hooks: Hooks) -> None:
    alice = await local_agent(net)
    hooks.failures_left["/flaky-1"] = 1
    hook = await webhook_agent(net, hooks, "/flaky-1")
    m = await send(net, alice, hook, "again")
    delivered = await status_of(net, alice, m.id, "delivered")
    assert delivered.attempts == 2
    # The same message both times, each signed (the handler verified both).
    assert [b["id"] for b in hooks.received["/flaky-1"]] == [m.id, m.id]


async def test_a_refusing_webhook_dead_letters_at_once(net: Net, hooks: Hooks) -> None:
    alice = await local_agent(net)
    hook = await webhook_agent(net, hooks, "/refuse-1")
    m = await send(net, alice, hook, "no thanks")
    dead = await status_of(net, alice, m.id, "dead_lettered")
    assert dead.attempts == 1 and dead.status_reason == "refused by the agent: HTTP 400"
    assert "own words" not in dead.status_reason
    assert len(hooks.received["/refuse-1"]) == 1


async def test_a_broken_webhook_ends_in_the_dead_letter_queue_while_others_flow(net: Net, hooks: Hooks) -> None:
    alice = await local_agent(net)
    broken = await webhook_agent(net, hooks, "/broken-1")
    healthy = await webhook_agent(net, hooks, "/ok-1")
    poison = await send(net, alice, broken, "never")
    fine = [await send(net, alice, healthy, f"fine {i}") for i in range(3)]
    dead = await status_of(net, alice, poison.id, "dead_lettered")
    # MESSAGING_MAX_ATTEMPTS is 3 in these tests.
    assert dead.attempts == 3 and dead.status_reason == "gave up after 3 attempts: HTTP 500"
    assert len(hooks.received["/broken-1"]) == 3
    for m in fine:
        assert (await status_of(net, alice, m.id, "delivered")).attempts == 1
    # Each was sent in a conversation of its own, and order is kept only within a conversation.
    assert sorted(b["parts"][0]["text"] for b in hooks.received["/ok-1"]) == ["fine 0", "fine 1", "fine 2"]
    listed = await net.messaging.ListDeadLetters(mpb.ListDeadLettersRequest(agent_id=broken.id), metadata=net.admin)
    assert [(x.id, x.status) for x in listed.messages] == [(poison.id, "dead_lettered")]


@dataclass
class WsAgent:
    """A WebSocket agent per the transport's frame protocol: acks each message, with a reply when its text is
    "reply", and a nack (permanent) when it is "nack"."""

    port: int = 0
    handshakes: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        self.handshakes += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(frame.data)
            assert data["type"] == "message"
            message = data["message"]
            self.received.append(message)
            text = message["parts"][0]["text"]
            if text == "reply":
                await ws.send_json({"type": "ack", "id": message["id"], "reply": REPLY})
            elif text == "nack":
                await ws.send_json({"type": "nack", "id": message["id"], "reason": "no such skill", "permanent": True})
            else:
                await ws.send_json({"type": "ack", "id": message["id"]})
        return ws


@pytest.fixture
async def ws_agent() -> AsyncIterator[WsAgent]:
    found = WsAgent()
    app = web.Application()
    app.router.add_get("/ws", found.handle)
    async with serve(app) as found.port:
        yield found
        # The mesh keeps its connection open; the server's cleanup would wait for it to end.
        await asyncio.gather(*(ws.close() for ws in found.sockets))


async def test_a_websocket_agent_acks_replies_and_nacks(net: Net, ws_agent: WsAgent) -> None:
    alice = await local_agent(net)
    agent = await local_agent(net, endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_WEBSOCKET, url=ws_agent.url())])
    plain = await send(net, alice, agent, "hello")
    assert plain.transport == "websocket"
    assert (await status_of(net, alice, plain.id, "delivered")).attempts == 1

    asked = await send(net, alice, agent, "reply")
    answer = await net.messaging.AwaitReply(mpb.AwaitReplyRequest(id=asked.id, wait_seconds=15), metadata=alice.md)
    assert answer.reply.parts[0].text == "pong"
    assert (answer.reply.in_reply_to, answer.reply.correlation_id) == (asked.id, asked.correlation_id)
    assert answer.reply.sender.agent_id == agent.id
    await status_of(net, alice, asked.id, "delivered")

    refused = await send(net, alice, agent, "nack")
    dead = await status_of(net, alice, refused.id, "dead_lettered")
    assert dead.attempts == 1 and "no such skill" in dead.status_reason
    assert [m["id"] for m in ws_agent.received] == [plain.id, asked.id, refused.id]
    assert ws_agent.received[0]["sender"]["agent_id"] == alice.id
    # One connection carried all three.
    assert ws_agent.handshakes == 1
