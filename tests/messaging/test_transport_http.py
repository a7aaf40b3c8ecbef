"""The HTTP webhook transport against a real agent on loopback that checks signatures with the standardwebhooks
library (the standard's own code): signed message JSON in, replies out, retryable and permanent failures."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import json_format
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from agentvault.common import agent_auth, egress
from agentvault.common import agents as rules
from agentvault.devserver.processes import free_port
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault_messaging.transports.base import DELIVERED, DeliveryError, Outbound, TransportContext
from agentvault_messaging.transports.http import HttpTransport

from ..loopback import serve

SECRET = secrets.token_bytes(32)
# What the agent is given: the Standard Webhooks form of the same secret.
AGENT_SECRET = "whsec_" + base64.b64encode(SECRET).decode()
REPLY = {"parts": [{"text": "pong"}], "headers": {"x-answer": "1"}, "conversation_id": "c-1"}


@dataclass
class Agent:
    port: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    redirect_target_hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    streamed: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        # The standard's verification, not ours: a bad signature or stale timestamp raises.
        verified: dict[str, Any] = Webhook(AGENT_SECRET).verify(body, dict(request.headers))
        return verified

    async def ok(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=204)

    async def reply(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"reply": REPLY})

    async def big_reply(self, request: web.Request) -> web.Response:
        await self._record(request)
        # Larger than one read from the socket: the whole answer must be read, not its first chunk.
        return web.json_response({"reply": {"parts": [{"text": "y" * 300_000}]}})

    async def bad_reply(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"reply": {"parts": [{"text": "x"}], "no_such_field": "secret-ish agent text"}})

    async def forged_reply(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {"reply": {"parts": [{"text": "x"}], "sender": {"agent_id": "someone-else"}, "status": "acknowledged"}}
        )

    async def busy(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=int(request.query["status"]), headers={"Retry-After": request.query["after"]})

    async def bad(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"error": "the agent's own words, not for the sender"}, status=400)

    async def slow(self, request: web.Request) -> web.Response:
        await self._record(request)
        await self.release.wait()
        return web.Response(status=204)

    async def redirect(self, request: web.Request) -> web.Response:
        await self._record(request)
        raise web.HTTPTemporaryRedirect(self.url("/target"))

    async def target(self, request: web.Request) -> web.Response:
        self.redirect_target_hits += 1
        return web.Response(status=204)

    async def endless(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"{" * 65536
        # Streams until the mesh hangs up (or the test ends): an unbounded read would never finish.
        while not self.release.is_set():
            try:
                await response.write(chunk)
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                break
            self.streamed += len(chunk)
        return response

    async def authed(self, request: web.Request) -> web.Response:
        await self._record(request)
        if request.headers.get("Authorization") != "Bearer the-token":
            return web.Response(status=401)
        return web.Response(status=204)


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    found = Agent()
    app = web.Application()
    for path, handler in [
        ("/ok", found.ok),
        ("/reply", found.reply),
        ("/big-reply", found.big_reply),
        ("/bad-reply", found.bad_reply),
        ("/forged-reply", found.forged_reply),
        ("/busy", found.busy),
        ("/bad", found.bad),
        ("/slow", found.slow),
        ("/redirect", found.redirect),
        ("/target", found.target),
        ("/endless", found.endless),
        ("/authed", found.authed),
    ]:
        app.router.add_post(path, handler)
    app.router.add_get("/target", found.target)
    async with serve(app) as found.port:
        try:
            yield found
        finally:
            found.release.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with egress.guarded_session(False) as opened:
        yield opened


def context(session: aiohttp.ClientSession, **overrides: Any) -> TransportContext:
    fields: dict[str, Any] = {"session": session, "auth": agent_auth.NO_AUTH, "signing_secret": SECRET}
    return TransportContext(**{**fields, **overrides})


def outbound(url: str, deadline: float = 5.0) -> Outbound:
    message = mpb.Message(
        id=str(uuid.uuid4()),
        sender=mpb.Party(agent_id="a-sender", kind="agent"),
        recipient=mpb.Party(agent_id="a-recipient"),
        conversation_id="conv-1",
        parts=[mpb.Part(text="hello, agent")],
        headers={"x-trace": "t1"},
    )
    return Outbound(message=message, agent_id="a-recipient", endpoint=url, attempt=1, deadline=deadline)


async def test_signed_message_json_verifies_with_the_standard_library(
    agent: Agent, session: aiohttp.ClientSession
) -> None:
    item = outbound(agent.url("/ok"))
    outcome = await HttpTransport().deliver(item, context(session))
    assert outcome.status == DELIVERED and outcome.replies == () and outcome.reason == ""
    [(headers, body)] = agent.received
    assert headers["webhook-id"] == item.message.id
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["Content-Type"] == "application/json"
    # The body is the message in its JSON form (proto field names).
    assert json.loads(body) == {
        "id": item.message.id,
        "sender": {"agent_id": "a-sender", "kind": "agent"},
        "recipient": {"agent_id": "a-recipient"},
        "conversation_id": "conv-1",
        "parts": [{"text": "hello, agent"}],
        "headers": {"x-trace": "t1"},
    }
    # The signature is bound to the secret and the body: another secret or one changed byte does not verify.
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(AGENT_SECRET).verify(body.replace(b"hello", b"jello"), headers)


async def test_reply_in_the_answer_comes_back(agent: Agent, session: aiohttp.ClientSession) -> None:
    outcome = await HttpTransport().deliver(outbound(agent.url("/reply")), context(session))
    assert outcome.status == DELIVERED and outcome.reason == ""
    [reply] = outcome.replies
    assert reply == json_format.ParseDict(REPLY, mpb.Message())


async def test_a_reply_larger_than_one_socket_read_is_read_whole(agent: Agent, session: aiohttp.ClientSession) -> None:
    outcome = await HttpTransport().deliver(outbound(agent.url("/big-reply")), context(session))
    assert outcome.reason == ""
    [reply] = outcome.replies
    assert reply.parts[0].text == "y" * 300_000


async def test_malformed_reply_is_dropped_but_delivered(agent: Agent, session: aiohttp.ClientSession) -> None:
    outcome = await HttpTransport().deliver(outbound(agent.url("/bad-reply")), context(session))
    assert outcome.status == DELIVERED and outcome.replies == ()
    assert "reply dropped" in outcome.reason and "agent text" not in outcome.reason


async def test_reply_cannot_claim_output_only_fields(agent: Agent, session: aiohttp.ClientSession) -> None:
    outcome = await HttpTransport().deliver(outbound(agent.url("/forged-reply")), context(session))
    [reply] = outcome.replies
    assert not reply.HasField("sender") and reply.status == "" and reply.parts[0].text == "x"


@pytest.mark.parametrize(("status", "after", "expected"), [(503, "7", 7.0), (429, "99999", 3600.0), (500, "7", None)])
async def test_busy_agent_is_retried_with_its_retry_after(
    agent: Agent, session: aiohttp.ClientSession, status: int, after: str, expected: float | None
) -> None:
    with pytest.raises(DeliveryError) as caught:
        await HttpTransport().deliver(outbound(agent.url(f"/busy?status={status}&after={after}")), context(session))
    assert not caught.value.permanent
    assert caught.value.retry_after == expected
    assert caught.value.reason == f"HTTP {status}"


async def test_refusal_is_permanent_and_keeps_the_agents_body_out(agent: Agent, session: aiohttp.ClientSession) -> None:
    with pytest.raises(DeliveryError) as caught:
        await HttpTransport().deliver(outbound(agent.url("/bad")), context(session))
    assert caught.value.permanent
    assert caught.value.reason == "HTTP 400"


async def test_slow_agent_past_the_deadline_is_retryable(agent: Agent, session: aiohttp.ClientSession) -> None:
    with pytest.raises(DeliveryError) as caught:
        await HttpTransport().deliver(outbound(agent.url("/slow"), deadline=0.3), context(session))
    assert not caught.value.permanent
    assert "0.3s" in caught.value.reason
    assert len(agent.received) == 1  # it did reach the agent; the answer is what never came


async def test_redirect_is_not_followed(agent: Agent, session: aiohttp.ClientSession) -> None:
    with pytest.raises(DeliveryError) as caught:
        await HttpTransport().deliver(outbound(agent.url("/redirect")), context(session))
    assert caught.value.permanent and "307" in caught.value.reason
    assert agent.redirect_target_hits == 0


async def test_endless_answer_is_read_only_up_to_the_bound(agent: Agent, session: aiohttp.ClientSession) -> None:
    limit = 64 * 1024
    outcome = await HttpTransport().deliver(
        outbound(agent.url("/endless"), deadline=3.0), context(session, max_answer_bytes=limit)
    )
    assert outcome.status == DELIVERED and outcome.replies == ()
    assert f"larger than {limit} bytes" in outcome.reason


async def test_agent_credentials_go_with_the_delivery(agent: Agent, session: aiohttp.ClientSession) -> None:
    bearer = agent_auth.PreparedAuth(rules.AUTH_BEARER, "fp", {"Authorization": "Bearer the-token"})
    outcome = await HttpTransport().deliver(outbound(agent.url("/authed")), context(session, auth=bearer))
    assert outcome.status == DELIVERED
    [(headers, _)] = agent.received
    assert headers["Authorization"] == "Bearer the-token"
    # Without them the same agent refuses: the header above is what made the difference.
    with pytest.raises(DeliveryError) as caught:
        await HttpTransport().deliver(outbound(agent.url("/authed")), context(session))
    assert caught.value.permanent and caught.value.reason == "HTTP 401"


async def test_unreachable_agent_is_retryable(session: aiohttp.ClientSession) -> None:
    with pytest.raises(DeliveryError) as caught:
        await HttpTransport().deliver(outbound(f"http://127.0.0.1:{free_port()}/hook"), context(session))
    assert not caught.value.permanent and "connect" in caught.value.reason


async def test_private_address_is_refused_when_blocked(agent: Agent, session: aiohttp.ClientSession) -> None:
    with pytest.raises(DeliveryError) as caught:
        await HttpTransport().deliver(outbound(agent.url("/ok")), context(session, block_private=True))
    assert caught.value.permanent and "refused" in caught.value.reason
    assert agent.received == []
