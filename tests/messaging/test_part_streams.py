"""Messages sent open, real processes: parts appended by the sender reach readers as they come, and resume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentvault.client.messaging import MessagingClient
from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, auth, eventually
from .conftest import MESSAGING_ENV, POLICIES, LocalAgent, Net, local_agent, policy

MAX_PARTS = 64
MAX_BYTES = 8192
IDLE_SECONDS = 4
WAIT = 15.0  # generous: only a failure waits this long


@pytest.fixture(scope="module")
async def net(mesh_factory: MeshFactory) -> AsyncIterator[Net]:
    env = {
        **MESSAGING_ENV,
        "MESSAGING_METRICS_PORT": str(free_port()),
        "MESSAGING_STREAM_MAX_PARTS": str(MAX_PARTS),
        "MESSAGING_STREAM_MAX_BYTES": str(MAX_BYTES),
        "MESSAGING_STREAM_IDLE_SECONDS": str(IDLE_SECONDS),
    }
    mesh = mesh_factory(name="part_streams", env=env)
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


def info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            found = error_details_pb2.ErrorInfo()
            detail.Unpack(found)
            return found
    raise AssertionError("no ErrorInfo")


async def open_message(n: Net, sender: LocalAgent, to: LocalAgent, *texts: str) -> str:
    sent = await n.messaging.SendMessage(
        mpb.SendMessageRequest(
            message=mpb.Message(recipient=to.party(), parts=[mpb.Part(text=t) for t in texts], streaming=True)
        ),
        metadata=sender.md,
    )
    assert sent.message.status == "accepted" and sent.message.streaming
    return str(sent.message.id)


async def append(
    n: Net, sender: LocalAgent, message_id: str, first: int, *texts: str, final: bool = False
) -> mpb.AppendPartsResponse:
    answer: mpb.AppendPartsResponse = await n.messaging.AppendParts(
        mpb.AppendPartsRequest(
            message_id=message_id, first_index=first, parts=[mpb.Part(text=t) for t in texts], final=final
        ),
        metadata=sender.md,
    )
    return answer


async def fail(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_tokens_reach_a_live_reader_one_by_one_as_they_come(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    # Sent open with no part yet (a closed message still needs one).
    err = await fail(
        net.messaging.SendMessage(mpb.SendMessageRequest(message=mpb.Message(recipient=bob.party())), metadata=alice.md)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    message_id = await open_message(net, alice, bob)
    # The message itself is delivered as any other, saying that its parts stream.
    got = await net.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(wait_seconds=10), metadata=bob.md)
    assert [d.message.id for d in got.deliveries] == [message_id] and got.deliveries[0].message.streaming

    reader = net.messaging.StreamParts(mpb.StreamPartsRequest(message_id=message_id), metadata=bob.md)
    tokens = ["The", " quick", " brown", " fox"]
    for k, token in enumerate(tokens, start=1):
        answer = await append(net, alice, message_id, k, token)
        assert (answer.next_index, answer.state) == (k + 1, "open")
        # Part k reaches the reader before part k+1 is appended: it came as it was appended, not at the end.
        item = await asyncio.wait_for(reader.read(), WAIT)
        assert (item.index, item.part.text, item.state) == (k, token, "")
    answer = await append(net, alice, message_id, len(tokens) + 1, final=True)
    assert answer.state == "closed"
    end = await asyncio.wait_for(reader.read(), WAIT)
    assert (end.index, end.state, end.HasField("part")) == (len(tokens), "closed", False)
    assert await asyncio.wait_for(reader.read(), WAIT) is grpc.aio.EOF


async def read_all(n: Net, who: LocalAgent, message_id: str, after: int = 0) -> list[mpb.StreamPartsResponse]:
    items = []
    async for item in n.messaging.StreamParts(
        mpb.StreamPartsRequest(message_id=message_id, after_index=after), metadata=who.md
    ):
        items.append(item)
    return items


async def test_a_broken_stream_resumes_from_the_last_part_received_without_loss_or_duplicates(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob, "a", "b")
    await append(net, alice, message_id, 3, "c", "d", "e")
    received: list[tuple[int, str]] = []
    reader = net.messaging.StreamParts(mpb.StreamPartsRequest(message_id=message_id), metadata=bob.md)
    for _ in range(3):
        item = await asyncio.wait_for(reader.read(), WAIT)
        received.append((item.index, item.part.text))
    reader.cancel()  # the reader's connection breaks mid-stream
    await append(net, alice, message_id, 6, "f", final=True)
    resumed = await asyncio.wait_for(read_all(net, bob, message_id, after=received[-1][0]), WAIT)
    received += [(i.index, i.part.text) for i in resumed if not i.state]
    assert received == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e"), (6, "f")]
    assert resumed[-1].state == "closed"
    # The sender may read its own stream too.
    assert [i.part.text for i in await read_all(net, alice, message_id, after=5)] == ["f", ""]


async def test_a_retried_append_is_idempotent_and_a_gap_or_other_content_is_refused(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob, "a")
    assert (await append(net, alice, message_id, 2, "b", "c")).next_index == 4
    assert (await append(net, alice, message_id, 2, "b", "c")).next_index == 4  # retried: nothing added
    assert (await append(net, alice, message_id, 3, "c", "d")).next_index == 5  # half retried: d added
    err = await fail(append(net, alice, message_id, 7, "x"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (info(err).reason, info(err).metadata["expected_index"]) == ("PART_INDEX_GAP", "5")
    err = await fail(append(net, alice, message_id, 4, "not d"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and info(err).reason == "PARTS_CONFLICT"
    err = await fail(append(net, alice, message_id, 0, "x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await append(net, alice, message_id, 5, final=True)).state == "closed"
    assert (await append(net, alice, message_id, 5, final=True)).state == "closed"  # a retried close
    err = await fail(append(net, alice, message_id, 5, "late"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and info(err).reason == "STREAM_CLOSED"
    items = await asyncio.wait_for(read_all(net, bob, message_id), WAIT)
    assert [(i.index, i.part.text) for i in items] == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (4, "")]


async def test_only_the_sender_appends_and_a_stranger_reads_nothing(net: Net) -> None:
    alice, bob, carol = await local_agent(net), await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob, "secret")
    err = await fail(append(net, bob, message_id, 2, "forged"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and info(err).reason == "NOT_THE_SENDER"
    err = await fail(append(net, carol, message_id, 2, "forged"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await fail(read_all(net, carol, message_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # A message sent closed takes no parts.
    sent = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=mpb.Message(recipient=bob.party(), parts=[mpb.Part(text="done")])),
        metadata=alice.md,
    )
    err = await fail(append(net, alice, sent.message.id, 2, "more"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and info(err).reason == "NOT_STREAMING"
    err = await fail(read_all(net, bob, sent.message.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and info(err).reason == "NOT_STREAMING"


async def test_a_stream_is_bounded_in_parts_and_bytes(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob)
    await append(net, alice, message_id, 1, *["t"] * MAX_PARTS)
    err = await fail(append(net, alice, message_id, MAX_PARTS + 1, "one too many"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info(err).reason == "STREAM_TOO_LARGE"
    # In bytes, through the edge: 413.
    other = await open_message(net, alice, bob)
    async with aiohttp.ClientSession(net.mesh.url("")) as http:
        path = f"/api/v1/messages/{other}/parts:append"
        body = {"first_index": 1, "parts": [{"text": "x" * (MAX_BYTES // 2)}]}
        async with http.post(path, json=body, headers=auth(alice.token)) as resp:
            assert resp.status == 200, await resp.text()
        body = {"first_index": 2, "parts": [{"text": "y" * (MAX_BYTES // 2)}]}
        async with http.post(path, json=body, headers=auth(alice.token)) as resp:
            answer = await resp.json()
            assert resp.status == 413, answer
            assert answer["error"]["status"] == "RESOURCE_EXHAUSTED"
    # What was refused was not stored.
    assert (await append(net, alice, other, 2, final=True)).next_index == 2


async def test_an_idle_stream_is_aborted_and_its_reader_ends(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob, "hello")
    # Nothing more comes: the sweeper aborts the stream after MESSAGING_STREAM_IDLE_SECONDS, and the reader ends.
    items = await asyncio.wait_for(read_all(net, bob, message_id), IDLE_SECONDS + WAIT)
    assert [i.part.text for i in items[:-1]] == ["hello"]
    assert items[-1].state == "aborted" and "MESSAGING_STREAM_IDLE_SECONDS" in items[-1].reason
    err = await fail(append(net, alice, message_id, 2, "too late"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and info(err).reason == "STREAM_CLOSED"


class Sse:
    """One server-sent event stream, event by event: (id, kind, data)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self) -> tuple[str, str, Any]:
        async def read() -> tuple[str, str, Any]:
            event_id, kind = "", "message"
            while True:
                line = (await self.resp.content.readline()).decode()
                if not line:
                    raise AssertionError("the stream ended")
                line = line.rstrip("\n")
                if line.startswith("id: "):
                    event_id = line.removeprefix("id: ")
                elif line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    return event_id, kind, json.loads(line.removeprefix("data: "))

        return await asyncio.wait_for(read(), WAIT)


async def test_over_sse_each_event_id_is_its_index_and_last_event_id_resumes(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    async with aiohttp.ClientSession(net.mesh.url(""), timeout=aiohttp.ClientTimeout(total=60)) as http:
        sent = {"recipient": {"agent_id": bob.id}, "parts": [], "streaming": True}
        async with http.post("/api/v1/messages", json=sent, headers=auth(alice.token)) as resp:
            assert resp.status == 200, await resp.text()
            message_id = (await resp.json())["message"]["id"]
        append_path = f"/api/v1/messages/{message_id}/parts:append"
        stream_path = f"/api/v1/messages/{message_id}/parts:stream"

        async def add(first: int, text: str, final: bool = False) -> None:
            body = {"first_index": first, "parts": [{"text": text}] if text else [], "final": final}
            async with http.post(append_path, json=body, headers=auth(alice.token)) as resp:
                assert resp.status == 200, await resp.text()

        received: list[tuple[str, str]] = []
        async with http.get(stream_path, headers=auth(bob.token)) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            events = Sse(resp)
            for k, token in enumerate(["one", "two"], start=1):
                await add(k, token)
                event_id, _, data = await events.next()  # arrived before the next token is appended
                assert event_id == str(k) == str(data["index"])
                received.append((event_id, data["part"]["text"]))
        # The connection broke; meanwhile more came.
        await add(3, "three")
        await add(4, "four", final=True)
        async with http.get(stream_path, headers={**auth(bob.token), "Last-Event-ID": received[-1][0]}) as resp:
            assert resp.status == 200
            events = Sse(resp)
            while True:
                event_id, kind, data = await events.next()
                assert kind == "message"
                if data.get("state"):
                    assert (event_id, data["state"]) == ("4", "closed")
                    break
                received.append((event_id, data["part"]["text"]))
        assert received == [("1", "one"), ("2", "two"), ("3", "three"), ("4", "four")]
        # A Last-Event-ID that is not an index is a bad request, not a 500.
        async with http.get(stream_path, headers={**auth(bob.token), "Last-Event-ID": "x"}) as resp:
            assert resp.status == 400, await resp.text()


async def test_the_client_appends_and_reads_a_stream(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob, "a")
    async with (
        MessagingClient(net.mesh.address("messaging"), token=alice.token) as sender,
        MessagingClient(net.mesh.address("messaging"), token=bob.token) as reader,
    ):
        assert (await sender.append_parts(message_id, 2, [mpb.Part(text="b")])).next_index == 3
        assert (await sender.append_parts(message_id, 3, [], final=True)).state == "closed"
        items = [i async for i in reader.stream_parts(message_id, after_index=1)]
    assert [(i.index, i.part.text, i.state) for i in items] == [(2, "b", ""), (2, "", "closed")]


async def test_the_sender_aborts_a_stream_with_a_reason(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob, "a")
    answer = await net.messaging.AppendParts(
        mpb.AppendPartsRequest(
            message_id=message_id, first_index=2, parts=[mpb.Part(text="b")], abort_reason="the user cancelled"
        ),
        metadata=alice.md,
    )
    assert (answer.next_index, answer.state) == (3, "aborted")
    items = await asyncio.wait_for(read_all(net, bob, message_id), WAIT)
    assert [(i.index, i.part.text, i.state, i.reason) for i in items] == [
        (1, "a", "", ""),
        (2, "b", "", ""),
        (2, "", "aborted", "the user cancelled"),
    ]


async def test_a_message_shows_its_streams_state_and_parts_so_far(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message_id = await open_message(net, alice, bob, "a")
    plain = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=mpb.Message(recipient=bob.party(), parts=[mpb.Part(text="plain")])),
        metadata=alice.md,
    )

    async def shown(who: LocalAgent) -> dict[str, tuple[str, int]]:
        got = await net.messaging.GetMessage(mpb.GetMessageRequest(id=message_id), metadata=who.md)
        listed = await net.messaging.ListMessages(mpb.ListMessagesRequest(agent_id=bob.id), metadata=who.md)
        assert (got.stream_state, got.stream_parts) == next(
            (m.stream_state, m.stream_parts) for m in listed.messages if m.id == message_id
        )
        return {m.id: (m.stream_state, m.stream_parts) for m in listed.messages}

    assert (await shown(alice))[message_id] == ("open", 1)
    assert (await shown(bob))[plain.message.id] == ("", 0)
    await append(net, alice, message_id, 2, "b", "c")
    assert (await shown(bob))[message_id] == ("open", 3)
    await append(net, alice, message_id, 4, final=True)
    assert (await shown(alice))[message_id] == ("closed", 3)
    # Through the edge too.
    async with (
        aiohttp.ClientSession(net.mesh.url("")) as http,
        http.get(f"/api/v1/messages/{message_id}", headers=auth(bob.token)) as resp,
    ):
        body = await resp.json()
        assert resp.status == 200, body
        assert (body["stream_state"], body["stream_parts"]) == ("closed", 3)


async def scrape(n: Net) -> dict[str, float]:
    """The messaging service's /metrics, sample by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{n.mesh.env['MESSAGING_METRICS_PORT']}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return samples


async def test_stream_metrics_count_parts_ends_and_open_streams(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    parts, open_now = "message_stream_parts_appended_total{}", "message_streams_open{}"

    def ended(how: str) -> str:
        return "message_streams_ended_total" + json.dumps({"how": how})

    before = await scrape(net)
    closed_id = await open_message(net, alice, bob, "a")
    idle_id = await open_message(net, alice, bob, "x")
    await append(net, alice, closed_id, 2, "b", "c")
    await append(net, alice, closed_id, 2, "b", "c")  # a retry: counted once
    await append(net, alice, closed_id, 4, "d", final=True)
    after = await scrape(net)
    assert after[parts] - before[parts] == 3
    assert after[ended("closed")] - before[ended("closed")] == 1

    async def swept_open() -> None:
        assert (await scrape(net))[open_now] >= 1  # the idle one, counted by a sweep

    await eventually(swept_open, WAIT)
    # The sweeper aborts the idle one; then no stream is open.
    await asyncio.wait_for(read_all(net, bob, idle_id), IDLE_SECONDS + WAIT)

    async def swept_idle() -> None:
        now = await scrape(net)
        assert now[ended("idle")] - before[ended("idle")] >= 1
        assert now[open_now] == 0

    await eventually(swept_idle, WAIT)
