"""Per-instance inboxes on a mesh of real processes: a session held by a named instance of its owner routes its
conversation's messages to that instance; a handoff between instances re-addresses them; bad labels are refused."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.messaging.v1 import session_service_pb2 as spb
from agentvault.messaging.v1 import session_service_pb2_grpc as spb_grpc

from ..conftest import auth, edge_violations, eventually
from ..registry.test_agents_grpc import violations
from .conftest import POLICIES, LocalAgent, Net, local_agent, policy, text_message
from .test_edge_messages import Sse
from .test_handoff import HANDOFF_POLICIES, new_session


@pytest.fixture(scope="module")
async def mesh(net: Net) -> Net:
    for text in (*POLICIES, *HANDOFF_POLICIES):
        await policy(net, text)
    return net


@pytest.fixture(scope="module")
async def sessions(mesh: Net) -> AsyncIterator[spb_grpc.SessionServiceStub]:
    async with grpc.aio.insecure_channel(mesh.mesh.address("messaging")) as channel:
        yield spb_grpc.SessionServiceStub(channel)


@pytest.fixture(scope="module")
async def db(mesh: Net) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(mesh.mesh.database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def send(n: Net, sender: LocalAgent, to: LocalAgent, text: str, conversation: str) -> mpb.Message:
    sent = await n.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(to, text, conversation_id=conversation)), metadata=sender.md
    )
    return sent.message


async def receive(n: Net, who: LocalAgent, instance: str, wait: int = 0) -> dict[str, mpb.Delivery]:
    """What one receive call of `instance` ("" none) takes, acknowledged: delivery by message id."""
    got = await n.messaging.ReceiveMessages(
        mpb.ReceiveMessagesRequest(max_messages=100, wait_seconds=wait, instance=instance), metadata=who.md
    )
    for d in got.deliveries:
        await n.messaging.AckMessage(mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt), metadata=who.md)
    return {d.message.id: d for d in got.deliveries}


async def received_by(n: Net, who: LocalAgent, instance: str, *message_ids: str) -> dict[str, mpb.Delivery]:
    """Receives as `instance` until all of `message_ids` came (long polls, no fixed sleeps)."""
    found: dict[str, mpb.Delivery] = {}

    async def came() -> None:
        found.update(await receive(n, who, instance, wait=1))
        assert set(message_ids) <= set(found), list(found)

    await eventually(came, 10)
    return found


async def handoff_to(
    s: spb_grpc.SessionServiceStub, owner: LocalAgent, session: spb.Session, to: LocalAgent, *, origin: str, target: str
) -> spb.Handoff:
    """Offered by the owner's instance `origin` to `to`'s instance `target`, accepted by that instance."""
    offered = await s.InitiateHandoff(
        spb.InitiateHandoffRequest(
            session_id=session.id, target=spb.HandoffTarget(agent_id=to.id, instance=target), instance=origin
        ),
        metadata=owner.md,
    )
    got = await s.GetHandoff(spb.GetHandoffRequest(id=offered.id), metadata=to.md)
    return await s.AcceptHandoff(
        spb.AcceptHandoffRequest(
            id=offered.id, state_sha256=got.state_sha256, signature=got.signature, instance=target
        ),
        metadata=to.md,
    )


async def test_a_sessions_messages_go_to_its_instance_and_follow_a_handoff_between_instances(
    mesh: Net, sessions: spb_grpc.SessionServiceStub, db: asyncpg.Connection
) -> None:
    alice, carol = await local_agent(mesh), await local_agent(mesh)
    session = await new_session(sessions, alice, owner_instance="a")
    conversation = session.conversation_id

    first = await send(mesh, carol, alice, "for a", conversation)
    assert (first.recipient.agent_id, first.recipient_instance) == (alice.id, "a")
    # Neither instance b nor a receiver naming no instance takes it; instance a does.
    assert first.id not in await receive(mesh, alice, "b", wait=1)
    assert first.id not in await receive(mesh, alice, "", wait=1)
    delivery = (await received_by(mesh, alice, "a", first.id))[first.id]
    assert delivery.message.recipient_instance == "a"

    # Waiting unclaimed at the handoff: it moves to instance b with the session.
    queued = await send(mesh, carol, alice, "queued", conversation)
    assert queued.recipient_instance == "a"
    done = await handoff_to(sessions, alice, session, alice, origin="a", target="b")
    assert done.status == "accepted" and done.accepted_instance == "b"
    now = await sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (now.owner_agent_id, now.owner_instance) == (alice.id, "b")
    moved = await mesh.messaging.GetMessage(mpb.GetMessageRequest(id=queued.id), metadata=alice.md)
    assert moved.recipient_instance == "b" and moved.status == "accepted"
    # The handoff's notices are addressed to the instances it names: the offer to b, its end to a.
    notices = await db.fetch("SELECT recipient_instance FROM messages WHERE conversation_id = $1", f"handoff:{done.id}")
    assert sorted(r["recipient_instance"] for r in notices) == ["a", "b"], notices

    after = await send(mesh, carol, alice, "for b", conversation)
    assert after.recipient_instance == "b"
    taken_by_a = await receive(mesh, alice, "a", wait=1)
    assert queued.id not in taken_by_a and after.id not in taken_by_a
    await received_by(mesh, alice, "b", queued.id, after.id)

    # A reply to the instance holding the conversation goes to it too.
    request = await mesh.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(carol, "question", conversation_id=conversation)),
        metadata=alice.md,
    )
    got = (await received_by(mesh, carol, "", request.message.id))[request.message.id]
    reply = await mesh.messaging.SendMessage(
        mpb.SendMessageRequest(message=mpb.Message(in_reply_to=got.message.id, parts=[mpb.Part(text="answer")])),
        metadata=carol.md,
    )
    assert reply.message.recipient_instance == "b"
    assert reply.message.id not in await receive(mesh, alice, "a", wait=1)
    await received_by(mesh, alice, "b", reply.message.id)

    # Handed on to another agent's named instance: what waits moves there, re-addressed.
    bob = await local_agent(mesh)
    waiting = await send(mesh, carol, alice, "for bob's x", conversation)
    await handoff_to(sessions, alice, session, bob, origin="b", target="x")
    row = await db.fetchrow("SELECT inbox, recipient_instance FROM messages WHERE id = $1", uuid.UUID(waiting.id))
    assert (row["inbox"], row["recipient_instance"]) == (f"agent:{bob.id}", "x")
    assert waiting.id not in await receive(mesh, bob, "", wait=1)
    await received_by(mesh, bob, "x", waiting.id)
    later = await send(mesh, carol, alice, "to the old owner", conversation)
    assert (later.recipient.agent_id, later.recipient_instance) == (bob.id, "x")


async def test_messages_addressed_to_no_instance_are_taken_by_any_receiver(
    mesh: Net, sessions: spb_grpc.SessionServiceStub
) -> None:
    alice, carol = await local_agent(mesh), await local_agent(mesh)
    await new_session(sessions, alice, owner_instance="a")  # a session of another conversation
    one = await send(mesh, carol, alice, "one", f"other-{secrets.token_hex(4)}")
    two = await send(mesh, carol, alice, "two", f"other-{secrets.token_hex(4)}")
    three = await send(mesh, carol, alice, "three", f"other-{secrets.token_hex(4)}")
    assert one.recipient_instance == two.recipient_instance == three.recipient_instance == ""
    # Each is claimed once, by whichever receiver comes first: here a, then b, then one naming none.
    got_a = await receive(mesh, alice, "a", wait=1)
    assert set(got_a) >= {one.id, two.id, three.id}
    four = await send(mesh, carol, alice, "four", f"other-{secrets.token_hex(4)}")
    await received_by(mesh, alice, "b", four.id)
    five = await send(mesh, carol, alice, "five", f"other-{secrets.token_hex(4)}")
    await received_by(mesh, alice, "", five.id)


async def test_a_streaming_instance_is_woken_for_its_messages(mesh: Net, sessions: spb_grpc.SessionServiceStub) -> None:
    alice, carol = await local_agent(mesh), await local_agent(mesh)
    session = await new_session(sessions, alice, owner_instance="s1")
    async with grpc.aio.insecure_channel(mesh.mesh.address("messaging")) as channel:
        stub = mpb_grpc.MessagingServiceStub(channel)
        # A stream naming no instance is not handed it; one naming s1 is woken for it.
        unnamed = stub.StreamInbox(mpb.StreamInboxRequest(), metadata=alice.md)
        stream = stub.StreamInbox(mpb.StreamInboxRequest(instance="s1"), metadata=alice.md)
        sent = await send(mesh, carol, alice, "streamed", session.conversation_id)
        delivery = await asyncio.wait_for(stream.read(), 10)
        assert delivery.message.id == sent.id and delivery.message.recipient_instance == "s1"
        plain = await send(mesh, carol, alice, "any instance", f"other-{secrets.token_hex(4)}")
        first = await asyncio.wait_for(unnamed.read(), 10)
        assert first.message.id == plain.id  # the session's message was never offered to it
        stream.cancel()
        unnamed.cancel()


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "tab\there", "é"])
async def test_bad_instance_labels_are_invalid_argument(mesh: Net, bad: str) -> None:
    alice = await local_agent(mesh)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(instance=bad), metadata=alice.md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance" in violations(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in mesh.messaging.StreamInbox(mpb.StreamInboxRequest(instance=bad), metadata=alice.md):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance" in violations(caught.value)


async def test_instances_through_the_edge(mesh: Net, sessions: spb_grpc.SessionServiceStub) -> None:
    alice, carol = await local_agent(mesh), await local_agent(mesh)
    session = await new_session(sessions, alice, owner_instance="web-1")
    async with aiohttp.ClientSession(mesh.mesh.url(""), timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def call(method: str, path: str, who: LocalAgent, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, path, headers=auth(who.token), json=body) as resp:
                return resp.status, await resp.json()

        status, sent = await call(
            "POST",
            "/api/v1/messages",
            carol,
            {
                "recipient": {"agent_id": alice.id},
                "parts": [{"text": "rest"}],
                "conversation_id": session.conversation_id,
            },
        )
        assert status == 200 and sent["message"]["recipient_instance"] == "web-1", sent
        message_id = sent["message"]["id"]
        status, other = await call("POST", "/api/v1/inbox:receive", alice, {"instance": "web-2", "wait_seconds": 1})
        assert status == 200 and message_id not in [d["message"]["id"] for d in other.get("deliveries", [])]
        status, got = await call("POST", "/api/v1/inbox:receive", alice, {"instance": "web-1", "wait_seconds": 5})
        assert status == 200, got
        [delivery] = [d for d in got["deliveries"] if d["message"]["id"] == message_id]
        assert delivery["message"]["recipient_instance"] == "web-1"

        # The stream names its instance in the query; woken for the next message of the conversation.
        async with http.get("/api/v1/inbox:stream", params={"instance": "web-1"}, headers=auth(alice.token)) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            events = Sse(resp)
            status, streamed = await call(
                "POST",
                "/api/v1/messages",
                carol,
                {
                    "recipient": {"agent_id": alice.id},
                    "parts": [{"text": "sse"}],
                    "conversation_id": session.conversation_id,
                },
            )
            assert status == 200, streamed
            kind, event = await events.next()
            assert kind == "message" and event["message"]["id"] == streamed["message"]["id"], event

        for method, path, body in (
            ("POST", "/api/v1/inbox:receive", {"instance": "has space"}),
            ("GET", "/api/v1/inbox:stream?instance=" + "x" * 129, None),
        ):
            status, answer = await call(method, path, alice, body)
            assert status == 400, answer
            assert answer["error"]["status"] == "INVALID_ARGUMENT"
            assert "instance" in edge_violations(answer), json.dumps(answer)
