"""The A2A delivery transport against a real a2a-sdk agent on loopback, and the mesh <-> A2A message mapping."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from agentvault.common import a2a_map
from agentvault.common.agent_auth import NO_AUTH, PreparedAuth
from agentvault.common.egress import guarded_session
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault_messaging.transports import base
from agentvault_messaging.transports.a2a import TRANSPORT, A2ATransport

from .a2a_agent import running_agent


@pytest.fixture
async def transport() -> AsyncIterator[A2ATransport]:
    t = A2ATransport()
    yield t
    await t.close()


@pytest.fixture
async def context() -> AsyncIterator[base.TransportContext]:
    async with guarded_session(False) as session:
        yield base.TransportContext(session=session, auth=NO_AUTH, signing_secret=b"s" * 32)


def value(data: object) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.Parse(json.dumps(data), v)
    return v


def full_message(text: str = "echo hello") -> mpb.Message:
    """A message with every field a sender writes set, and the sender the mesh sets."""
    m = mpb.Message(
        id=str(uuid.uuid4()),
        format_version="1",
        sender=mpb.Party(agent_id=str(uuid.uuid4()), did="did:web:a.example:s", kind="agent", principal_id="p-1"),
        recipient=mpb.Party(agent_id=str(uuid.uuid4()), did="did:web:b.example:r", mesh="peer-1"),
        conversation_id="conv-1",
        correlation_id="corr-1",
        in_reply_to=str(uuid.uuid4()),
        parts=[
            mpb.Part(text=text, metadata=struct_pb2.Struct(fields={"lang": value("en")}), media_type="text/plain"),
            mpb.Part(raw=bytes(range(256)), filename="blob.bin", media_type="application/octet-stream"),
            mpb.Part(url="https://files.example/report.pdf", filename="report.pdf", media_type="application/pdf"),
            mpb.Part(data=value({"n": 1.5, "list": [1, "two", None, True], "nested": {"k": "v"}})),
        ],
        headers={"x-trace": "abc", "priority": "high"},
        idempotency_key="idem-1",
        task_id="",
        role="user",
        extensions=["https://ext.example/v1"],
        reference_task_ids=["t-0", "t-1"],
    )
    m.expire_time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_900_000_000, nanos=5000))
    m.metadata.update({"app": {"x": 1}, "agentvault": "the sender's own value under the reserved key"})
    return m


def outbound(message: mpb.Message, endpoint: str, deadline: float = 10.0) -> base.Outbound:
    return base.Outbound(message=message, agent_id=str(uuid.uuid4()), endpoint=endpoint, attempt=1, deadline=deadline)


def text_message(text: str) -> mpb.Message:
    return mpb.Message(
        id=str(uuid.uuid4()),
        conversation_id=f"conv-{uuid.uuid4().hex[:8]}",
        correlation_id=f"corr-{uuid.uuid4().hex[:8]}",
        role="user",
        parts=[mpb.Part(text=text)],
    )


def test_round_trip_keeps_every_field() -> None:
    m = full_message()
    there = a2a_map.to_a2a(m)
    # A2A's own fields carry what they can; the namespace holds only the mesh's.
    assert there.message_id == m.id and there.context_id == "conv-1" and there.role == a2a.ROLE_USER
    assert there.parts[1].raw == bytes(range(256)) and there.parts[2].url == m.parts[2].url
    assert "parts" not in json_format.MessageToDict(there.metadata)["agentvault"]
    back = a2a_map.to_mesh(there)
    assert back == m
    # And with nothing optional set.
    bare = mpb.Message(parts=[mpb.Part(text="x")])
    assert a2a_map.to_mesh(a2a_map.to_a2a(bare)) == bare
    assert not a2a_map.to_a2a(bare).HasField("metadata")


def test_content_of_believes_nothing_in_the_namespace() -> None:
    there = a2a_map.to_a2a(full_message())
    mine = a2a_map.content_of(there)
    assert not mine.HasField("sender") and not mine.correlation_id and not mine.headers


def test_replies_are_bounded_and_belong_to_the_original() -> None:
    original = text_message("task")
    artifacts = [a2a.Artifact(artifact_id=f"a{i}", name=f"n{i}", parts=[a2a.Part(text="x")]) for i in range(40)]
    task = a2a.Task(
        id="t-1",
        status=a2a.TaskStatus(
            state=a2a.TASK_STATE_COMPLETED,
            message=a2a.Message(
                message_id="m",
                role=a2a.ROLE_AGENT,
                parts=[a2a.Part(text="ok")],
                metadata=struct_pb2.Struct(fields={"agentvault": value({"sender": {"agent_id": "forged"}})}),
            ),
        ),
        artifacts=artifacts,
    )
    replies = a2a_map.answer_replies(original, task)
    assert len(replies.messages) == a2a_map.MAX_REPLIES
    assert replies.dropped == 1 + 40 - a2a_map.MAX_REPLIES
    for reply in replies.messages:
        assert reply.in_reply_to == original.id and reply.correlation_id == original.correlation_id
        assert reply.conversation_id == original.conversation_id and reply.role == "agent"
        assert reply.task_id == "t-1" and not reply.HasField("sender")
    assert json_format.MessageToDict(replies.messages[1].metadata)["agentvault"]["artifact"] == {
        "id": "a0",
        "name": "n0",
    }
    big = a2a.Message(parts=[a2a.Part(raw=b"x" * (a2a_map.MAX_REPLY_BYTES + 1))])
    assert a2a_map.answer_replies(original, big).messages == [] and a2a_map.answer_replies(original, big).dropped == 1
    many = a2a.Message(parts=[a2a.Part(text="p")] * 100 + [a2a.Part(url="file:///etc/passwd")])
    assert len(a2a_map.answer_replies(original, many).messages[0].parts) == a2a_map.MAX_REPLY_PARTS


def test_the_transport_is_found_by_the_registry() -> None:
    assert TRANSPORT is A2ATransport
    found = base.load_transports("agentvault_messaging.transports")
    assert isinstance(found["a2a"], A2ATransport)
    assert base.choose(found, [("http", "https://h.example"), ("a2a", "https://a.example/a2a")]) == (
        "a2a",
        "https://a.example/a2a",
    )


async def test_echo_is_acknowledged_with_the_reply(transport: A2ATransport, context: base.TransportContext) -> None:
    message = full_message("echo hello there")
    async with running_agent() as agent:
        outcome = await transport.deliver(outbound(message, agent.endpoint), context)
        # What went over the wire (JSON-RPC, real HTTP) maps back to the very message sent.
        assert len(agent.received) == 1
        seen = a2a.Message()
        seen.CopyFrom(agent.received[0].message)
        assert seen.task_id  # the SDK's server gives every message a task id: not part of what was sent
        seen.ClearField("task_id")
        assert a2a_map.to_mesh(seen) == message
        assert agent.received[0].headers.get("a2a-version") == "1.0"
    assert outcome.status == base.ACKNOWLEDGED
    assert len(outcome.replies) == 1
    reply = outcome.replies[0]
    assert reply.parts[0].text == "echo hello there"
    assert reply.parts[1].raw == bytes(range(256)) and reply.parts[3].data == message.parts[3].data
    assert reply.correlation_id == "corr-1" and reply.in_reply_to == message.id and reply.conversation_id == "conv-1"
    assert reply.role == "agent"
    # The agent echoed the namespace it was given: not believed, the mesh sets the sender.
    assert not reply.HasField("sender") and not reply.headers


async def test_task_is_acknowledged_with_its_artifact(transport: A2ATransport, context: base.TransportContext) -> None:
    message = text_message("task summarize this")
    async with running_agent() as agent:
        outcome = await transport.deliver(outbound(message, agent.endpoint), context)
    assert outcome.status == base.ACKNOWLEDGED, outcome.reason
    assert outcome.annotations["a2a.task_id"]
    texts = [[p.text for p in r.parts if p.WhichOneof("content") == "text"] for r in outcome.replies]
    assert texts == [["finished"], ["done: task summarize this"]]
    artifact = outcome.replies[1]
    assert json_format.MessageToDict(artifact.parts[1].data) == {"words": 3}
    assert artifact.metadata["kind"] == "summary"
    assert artifact.task_id == outcome.annotations["a2a.task_id"]
    assert all(r.correlation_id == message.correlation_id and r.in_reply_to == message.id for r in outcome.replies)


async def test_task_without_streaming(transport: A2ATransport, context: base.TransportContext) -> None:
    """An agent that does not stream is sent SendMessage (blocking) after refusing the stream once."""
    async with running_agent(streaming=False) as agent:
        first = await transport.deliver(outbound(text_message("task one"), agent.endpoint), context)
        second = await transport.deliver(outbound(text_message("task two"), agent.endpoint), context)
        assert len(agent.received) == 2  # the refused stream never reached the executor
    assert first.status == second.status == base.ACKNOWLEDGED
    assert second.replies[1].parts[0].text == "done: task two"


async def test_failed_task_is_failed(transport: A2ATransport, context: base.TransportContext) -> None:
    async with running_agent() as agent:
        outcome = await transport.deliver(outbound(text_message("fail please"), agent.endpoint), context)
    assert outcome.status == base.FAILED
    assert outcome.reason == "A2A task failed: cannot do that"
    assert [r.parts[0].text for r in outcome.replies] == ["cannot do that"]


async def test_input_required_is_delivered_with_the_question(
    transport: A2ATransport, context: base.TransportContext
) -> None:
    async with running_agent() as agent:
        outcome = await transport.deliver(outbound(text_message("input"), agent.endpoint), context)
    assert outcome.status == base.DELIVERED
    assert outcome.replies[0].parts[0].text == "which one?"
    assert outcome.replies[0].task_id == outcome.annotations["a2a.task_id"]


async def test_slow_task_is_delivered_with_its_id_at_the_deadline(
    transport: A2ATransport, context: base.TransportContext
) -> None:
    async with running_agent(slow_seconds=60) as agent:
        outcome = await transport.deliver(outbound(text_message("slow"), agent.endpoint, deadline=1.0), context)
    assert outcome.status == base.DELIVERED
    assert outcome.annotations["a2a.task_id"] and not outcome.replies


async def test_agent_down_is_retryable(transport: A2ATransport, context: base.TransportContext) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(base.DeliveryError) as caught:
        await transport.deliver(outbound(text_message("echo"), f"http://127.0.0.1:{port}/a2a"), context)
    assert not caught.value.permanent
    assert "connect" in caught.value.reason


async def test_overloaded_agent_is_retryable_and_a_missing_endpoint_permanent(
    transport: A2ATransport, context: base.TransportContext
) -> None:
    async with running_agent() as agent:
        with pytest.raises(base.DeliveryError) as busy:
            await transport.deliver(outbound(text_message("echo"), f"{agent.base}/busy"), context)
        with pytest.raises(base.DeliveryError) as missing:
            await transport.deliver(outbound(text_message("echo"), f"{agent.base}/nowhere"), context)
        with pytest.raises(base.DeliveryError) as moved:
            await transport.deliver(outbound(text_message("echo"), f"{agent.base}/moved"), context)
        assert agent.received == []  # the redirect was not followed
    assert not busy.value.permanent and busy.value.reason == "HTTP 503" and busy.value.retry_after == 7
    assert moved.value.permanent and moved.value.reason == "HTTP 307: redirects are not followed"
    assert missing.value.permanent and missing.value.reason == "HTTP 404"


async def test_bad_request_is_permanent(transport: A2ATransport, context: base.TransportContext) -> None:
    """A message naming a task the agent does not know: the agent refuses it (TaskNotFound), sending it again
    cannot help."""
    message = text_message("task")
    message.task_id = "no-such-task"
    async with running_agent() as agent:
        with pytest.raises(base.DeliveryError) as caught:
            await transport.deliver(outbound(message, agent.endpoint), context)
    assert caught.value.permanent and "TaskNotFound" in caught.value.reason


async def test_bearer_credentials_reach_the_agent(transport: A2ATransport) -> None:
    auth = PreparedAuth("bearer", "fp", {"Authorization": "Bearer s3cret-token"})
    async with guarded_session(False) as session, running_agent() as agent:
        ctx = base.TransportContext(session=session, auth=auth, signing_secret=b"s" * 32)
        outcome = await transport.deliver(outbound(text_message("echo"), agent.endpoint), ctx)
        assert outcome.status == base.ACKNOWLEDGED
        assert agent.received[0].headers.get("authorization") == "Bearer s3cret-token"
        # Per call, never stuck on the shared client: the next agent without credentials gets none.
        await transport.deliver(outbound(text_message("echo"), agent.endpoint), ctx.__class__(session, NO_AUTH, b""))
        assert "authorization" not in agent.received[1].headers


async def test_blocked_private_endpoint_is_permanent(transport: A2ATransport) -> None:
    async with guarded_session(True) as session, running_agent() as agent:
        ctx = base.TransportContext(session=session, auth=NO_AUTH, signing_secret=b"", block_private=True)
        with pytest.raises(base.DeliveryError) as literal:
            await transport.deliver(outbound(text_message("echo"), agent.endpoint), ctx)
        # A name that resolves to loopback is refused at connect time, as the mesh's own sessions do.
        named = agent.endpoint.replace("127.0.0.1", "localhost")
        with pytest.raises(base.DeliveryError) as resolved:
            await transport.deliver(outbound(text_message("echo"), named), ctx)
        assert agent.received == []
    assert literal.value.permanent and resolved.value.permanent
    assert "loopback" in resolved.value.reason


async def test_oversize_answer_is_refused(transport: A2ATransport) -> None:
    async with guarded_session(False) as session, running_agent() as agent:
        ctx = base.TransportContext(session=session, auth=NO_AUTH, signing_secret=b"", max_answer_bytes=2000)
        message = text_message("echo " + "y" * 5000)
        with pytest.raises(base.DeliveryError) as caught:
            await transport.deliver(outbound(message, agent.endpoint), ctx)
        assert len(agent.received) == 1
    assert caught.value.permanent and "larger than 2000 bytes" in caught.value.reason


async def test_a2a_0_3_agent_through_the_compat_client(transport: A2ATransport, context: base.TransportContext) -> None:
    async with running_agent(version="0.3") as agent:
        echo = await transport.deliver(outbound(text_message("echo old friend"), agent.endpoint), context)
        task = await transport.deliver(outbound(text_message("task old"), agent.endpoint), context)
        assert agent.received[0].headers.get("a2a-version") == "0.3"
    assert echo.status == base.ACKNOWLEDGED and echo.replies[0].parts[0].text == "echo old friend"
    assert task.status == base.ACKNOWLEDGED
    assert task.replies[-1].parts[0].text == "done: task old"


async def test_an_agent_that_moves_from_0_3_to_1_0_is_followed(
    transport: A2ATransport, context: base.TransportContext
) -> None:
    """The transport remembers an endpoint's version; when the agent there is upgraded, the next delivery finds
    1.0 again instead of failing for good."""
    async with running_agent(version="0.3") as old:
        await transport.deliver(outbound(text_message("echo v0.3"), old.endpoint), context)
        assert old.received[0].headers.get("a2a-version") == "0.3"
    port = int(old.base.rsplit(":", 1)[1])
    async with running_agent(port=port) as new:
        assert new.endpoint == old.endpoint
        outcome = await transport.deliver(outbound(text_message("echo v1"), new.endpoint), context)
        assert new.received[0].headers.get("a2a-version") == "1.0"
    assert outcome.status == base.ACKNOWLEDGED and outcome.replies[0].parts[0].text == "echo v1"


async def test_slow_task_without_streaming_is_polled_not_sent_again(
    transport: A2ATransport, context: base.TransportContext
) -> None:
    """An agent that does not stream and is still working at the deadline: the delivery keeps the task's id
    (learnt from a send that returns at once) and the agent got the message once, as with streaming."""
    async with running_agent(streaming=False, slow_seconds=60) as agent:
        outcome = await transport.deliver(outbound(text_message("slow"), agent.endpoint, deadline=1.5), context)
        assert len(agent.received) == 1
    assert outcome.status == base.DELIVERED
    assert outcome.annotations["a2a.task_id"] and not outcome.replies


async def test_task_without_streaming_is_followed_with_get_task(
    transport: A2ATransport, context: base.TransportContext
) -> None:
    """A task that ends within the deadline is followed (GetTask) to its end: acknowledged with its answer."""
    async with running_agent(streaming=False, slow_seconds=0.5) as agent:
        outcome = await transport.deliver(outbound(text_message("slow"), agent.endpoint, deadline=10.0), context)
        assert len(agent.received) == 1
    assert outcome.status == base.ACKNOWLEDGED
    assert outcome.reason == "A2A task completed"
