"""Messaging through the edge, real processes: REST sends, reads, inboxes and acks, SSE status watches and inbox
streams, the message JSON Schema, and clear 4xx answers for oversize and bad messages."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from jsonschema import Draft202012Validator

from agentvault.common.errors import DOMAIN
from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, auth, edge_violations
from .conftest import MESSAGING_ENV, POLICIES, LocalAgent, Net, local_agent, policy

# Well below the edge's own body limit (EDGE_MAX_BODY_BYTES, 1 MiB), so that the service's bound is what answers.
MAX_MESSAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
async def net(mesh_factory: MeshFactory) -> AsyncIterator[Net]:
    env = {
        **MESSAGING_ENV,
        "MESSAGING_METRICS_PORT": str(free_port()),
        "MESSAGING_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
    }
    mesh = mesh_factory(name="edge_messaging", env=env)
    async with (
        grpc.aio.insecure_channel(mesh.address("registry")) as reg,
        grpc.aio.insecure_channel(mesh.address("messaging")) as msg,
    ):
        n = Net(
            mesh,
            pb_grpc.RegistryServiceStub(reg),
            ipb_grpc.IdentityServiceStub(reg),
            ppb_grpc.PolicyServiceStub(reg),
            mpb_grpc.MessagingServiceStub(msg),
        )
        await policy(n, POLICIES[0])  # messages to untagged agents are allowed
        yield n


@pytest.fixture(scope="module")
async def http(net: Net) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(net.mesh.url(""), timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, path: str, who: LocalAgent, body: Any = None, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, path, headers=auth(who.token), json=body, **kwargs) as resp:
        return resp.status, await resp.json()


def message(to: LocalAgent, text: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"recipient": {"agent_id": to.id}, "parts": [{"text": text}], **fields}


async def send(http: aiohttp.ClientSession, sender: LocalAgent, to: LocalAgent, text: str = "hello") -> dict[str, Any]:
    status, body = await call(http, "POST", "/api/v1/messages", sender, message(to, text))
    assert status == 200, body
    sent: dict[str, Any] = body["message"]
    return sent


class Sse:
    """Reads one server-sent event stream, event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, seconds: float = 10) -> tuple[str, Any]:
        async def read() -> tuple[str, Any]:
            kind = "message"
            while True:
                line = (await self.resp.content.readline()).decode()
                if not line:
                    raise AssertionError("the stream ended")
                line = line.rstrip("\n")
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    return kind, json.loads(line.removeprefix("data: "))

        return await asyncio.wait_for(read(), seconds)


def reason(body: dict[str, Any]) -> str:
    [info] = [d for d in body["error"]["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["domain"] == DOMAIN
    return str(info["reason"])


async def test_send_read_receive_and_ack_over_rest(net: Net, http: aiohttp.ClientSession) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    status, body = await call(
        http, "POST", "/api/v1/messages", alice, message(bob, "hi bob", headers={"topic": "greeting"})
    )
    assert status == 200, body
    sent = body["message"]
    assert (sent["status"], sent["transport"], sent["sender"]["agent_id"]) == ("accepted", "inbox", alice.id)
    assert body["duplicate"] is False

    status, got = await call(http, "GET", f"/api/v1/messages/{sent['id']}", alice)
    assert status == 200 and got["id"] == sent["id"] and [p["text"] for p in got["parts"]] == ["hi bob"]

    status, received = await call(http, "POST", "/api/v1/inbox:receive", bob, {"wait_seconds": 5})
    assert status == 200, received
    [delivery] = received["deliveries"]
    assert delivery["message"]["id"] == sent["id"] and delivery["attempt"] == 1
    assert delivery["message"]["headers"] == {"topic": "greeting"}
    status, acked = await call(http, "POST", f"/api/v1/inbox/{sent['id']}:ack", bob, {"receipt": delivery["receipt"]})
    assert (status, acked) == (200, {})
    status, got = await call(http, "GET", f"/api/v1/messages/{sent['id']}", alice)
    assert got["status"] == "acknowledged"
    # Someone else does not see it.
    carol = await local_agent(net)
    status, body = await call(http, "GET", f"/api/v1/messages/{sent['id']}", carol)
    assert status == 404 and reason(body) == "MESSAGE_NOT_FOUND"


async def test_a_watch_by_id_streams_its_status_changes_as_sse(net: Net, http: aiohttp.ClientSession) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    sent = await send(http, alice, bob)
    async with http.get("/api/v1/messages:watch", params={"id": sent["id"]}, headers=auth(alice.token)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = Sse(resp)
        kind, first = await events.next()
        assert kind == "message" and first["status"] == "accepted" and first["message"]["id"] == sent["id"]
        _, received = await call(http, "POST", "/api/v1/inbox:receive", bob, {"wait_seconds": 5})
        [delivery] = received["deliveries"]
        await call(http, "POST", f"/api/v1/inbox/{sent['id']}:ack", bob, {"receipt": delivery["receipt"]})
        seen = [first["status"]]
        while seen[-1] != "acknowledged":
            _, event = await events.next()
            assert event["message"]["id"] == sent["id"]
            assert "parts" not in event["message"] or not event["message"]["parts"]  # status only, no content
            seen.append(event["status"])
    assert seen[0] == "accepted" and seen[-1] == "acknowledged"


async def test_an_inbox_streams_as_sse(net: Net, http: aiohttp.ClientSession) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    async with http.get("/api/v1/inbox:stream", params={"max_in_flight": "5"}, headers=auth(bob.token)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = Sse(resp)
        ids = [(await send(http, alice, bob, f"s{i}"))["id"] for i in range(2)]
        deliveries = [(await events.next())[1], (await events.next())[1]]
        assert [d["message"]["id"] for d in deliveries] == ids
        assert [d["message"]["parts"][0]["text"] for d in deliveries] == ["s0", "s1"]
        for d in deliveries:
            status, _ = await call(
                http, "POST", f"/api/v1/inbox/{d['message']['id']}:ack", bob, {"receipt": d["receipt"]}
            )
            assert status == 200
    for message_id in ids:
        _, got = await call(http, "GET", f"/api/v1/messages/{message_id}", alice)
        assert got["status"] == "acknowledged"


async def test_the_message_schema_validates_a_real_message_and_rejects_a_bad_one(
    net: Net, http: aiohttp.ClientSession
) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    status, body = await call(http, "GET", "/api/v1/messages:schema", alice)
    assert status == 200
    schema = body["schema"]
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    real = message(
        bob,
        "hello",
        id=str(uuid.uuid4()),
        conversation_id="conv-1",
        headers={"x-trace": "t1"},
        idempotency_key="k-1",
        role="user",
        metadata={"any": ["json"]},
    )
    real["parts"].append({"data": {"n": 1}, "media_type": "application/json"})
    assert list(validator.iter_errors(real)) == []
    status, answer = await call(http, "POST", "/api/v1/messages", alice, real)
    assert status == 200, answer  # the service takes what the schema describes
    bad = {"recipient": {"agent_id": "not-a-uuid"}, "parts": [{}], "headers": {"bad name": "x"}, "role": "boss"}
    problems = {tuple(e.absolute_path) for e in validator.iter_errors(bad)}
    assert {("recipient", "agent_id"), ("parts", 0), ("headers",), ("role",)} <= problems
    status, answer = await call(http, "POST", "/api/v1/messages", alice, bad)
    assert status == 400  # and so does the service
    assert {"message.recipient.agent_id", "message.parts[0]", "message.headers", "message.role"} <= set(
        edge_violations(answer)
    )


async def test_an_oversize_message_is_413_from_the_service_not_429(net: Net, http: aiohttp.ClientSession) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    # Above MESSAGING_MAX_MESSAGE_BYTES, far below the edge's body limit: the service's bound answers.
    status, body = await call(http, "POST", "/api/v1/messages", alice, message(bob, "x" * (MAX_MESSAGE_BYTES + 100)))
    assert status == 413, body
    assert body["error"]["status"] == "RESOURCE_EXHAUSTED" and reason(body) == "MESSAGE_TOO_LARGE"
    assert str(MAX_MESSAGE_BYTES) in body["error"]["message"]
    # Just below it is taken.
    status, body = await call(http, "POST", "/api/v1/messages", alice, message(bob, "x" * (MAX_MESSAGE_BYTES - 200)))
    assert status == 200, body
    # Above the edge's own limit, the edge answers first (also 413, its own reason).
    status, body = await call(http, "POST", "/api/v1/messages", alice, message(bob, "x" * (1024 * 1024 + 10)))
    assert status == 413 and reason(body) == "BODY_TOO_LARGE"


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/api/v1/messages", {"recipient": {"agent_id": "nope"}, "parts": [{"text": "x"}]}, None),
        ("POST", "/api/v1/messages", {"parts": [{"text": "x"}]}, "message.recipient"),
        ("POST", "/api/v1/messages", {"recipient": {}, "parts": "text"}, None),
        ("POST", "/api/v1/messages", {"parts": [{"text": "x", "url": "https://a.example"}]}, None),
        ("POST", "/api/v1/messages", {"parts": [{"text": "x"}], "no_such_field": 1}, None),
        ("POST", "/api/v1/messages", {"parts": [{"url": "ftp://a"}], "in_reply_to": "x"}, "message.parts[0].url"),
        ("POST", "/api/v1/messages", {"parts": [{"text": "x"}], "expire_time": "yesterday"}, None),
        ("GET", "/api/v1/messages/not-a-uuid", None, "id"),
        ("POST", "/api/v1/inbox:receive", {"max_messages": 1000}, "max_messages"),
        ("POST", "/api/v1/inbox:receive", {"wait_seconds": -1}, "wait_seconds"),
        ("POST", f"/api/v1/inbox/{uuid.uuid4()}:ack", {"receipt": "r"}, "receipt"),
        ("POST", "/api/v1/inbox/x:ack", {"receipt": str(uuid.uuid4())}, "message_id"),
        ("GET", "/api/v1/messages:watch", None, "id"),
        ("GET", "/api/v1/inbox:stream?max_in_flight=5000", None, "max_in_flight"),
    ],
)
async def test_bad_input_is_400_with_field_violations(
    net: Net, http: aiohttp.ClientSession, method: str, path: str, body: Any, field: str | None
) -> None:
    alice = await local_agent(net)
    status, answer = await call(http, method, path, alice, body)
    assert status == 400, answer
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    violations = edge_violations(answer)
    assert violations
    if field is not None:
        assert field in violations, violations
