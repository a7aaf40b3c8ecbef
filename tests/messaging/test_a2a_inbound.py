"""External agents reach local agents through the mesh's A2A endpoint, with the a2a-sdk's own client."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientError
from a2a.types import a2a_pb2 as a2a
from a2a.utils import errors as a2a_errors

from agentvault.messaging.v1 import messaging_service_pb2 as mpb

from ..conftest import eventually
from .conftest import LocalAgent, Net, local_agent

pytestmark = pytest.mark.usefixtures("policies")


@dataclass
class Responder:
    """A local agent answering its inbox: each message acked, then replied to (in_reply_to) with "re: <text>",
    once `go` is set (set from the start unless a test holds it)."""

    net: Net
    agent: LocalAgent
    go: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[mpb.Message] = field(default_factory=list)
    taken: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            got = await self.net.messaging.ReceiveMessages(
                mpb.ReceiveMessagesRequest(wait_seconds=5), metadata=self.agent.md
            )
            for d in got.deliveries:
                self.received.append(d.message)
                self.taken.set()
                await self.go.wait()
                await self.net.messaging.AckMessage(
                    mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt), metadata=self.agent.md
                )
                reply = mpb.Message(in_reply_to=d.message.id, parts=[mpb.Part(text="re: " + d.message.parts[0].text)])
                await self.net.messaging.SendMessage(mpb.SendMessageRequest(message=reply), metadata=self.agent.md)


@contextlib.asynccontextmanager
async def answering(net: Net, agent: LocalAgent, *, hold: bool = False) -> AsyncIterator[Responder]:
    responder = Responder(net, agent)
    if not hold:
        responder.go.set()
    task = asyncio.create_task(responder.run())
    try:
        yield responder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def http_as(agent: LocalAgent | None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {agent.token}"} if agent else {}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        yield http


def endpoint(net: Net, agent: LocalAgent) -> str:
    return net.mesh.url(f"/a2a/agents/{agent.id}")


async def card_of(net: Net, http: httpx.AsyncClient, agent: LocalAgent) -> a2a.AgentCard:
    # The resolver reads <url>/.well-known/agent-card.json, as any A2A client does.
    return await A2ACardResolver(http, endpoint(net, agent)).get_agent_card()


def text_request(text: str, **fields: object) -> a2a.SendMessageRequest:
    message = a2a.Message(message_id=str(uuid.uuid4()), role=a2a.ROLE_USER, parts=[a2a.Part(text=text)], **fields)
    return a2a.SendMessageRequest(message=message)


def answer_text(task: a2a.Task) -> str:
    return task.status.message.parts[0].text


async def send(client: object, request: a2a.SendMessageRequest) -> list[a2a.StreamResponse]:
    return [event async for event in client.send_message(request)]  # type: ignore[attr-defined]


async def test_an_a2a_client_reaches_a_local_agent_through_the_mesh(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    async with http_as(alice) as http, answering(net, bob) as responder:
        card = await card_of(net, http, bob)
        assert {(i.url, i.protocol_binding, i.protocol_version) for i in card.supported_interfaces} == {
            (endpoint(net, bob), "JSONRPC", "1.0"),
            (endpoint(net, bob), "JSONRPC", "0.3"),
        }
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)
        request = text_request("hello bob", context_id="conv-a2a-1")
        [event] = await send(client, request)
        task = event.task
        assert task.status.state == a2a.TASK_STATE_COMPLETED, task
        assert answer_text(task) == "re: hello bob" and task.context_id == "conv-a2a-1"
        assert task.status.message.role == a2a.ROLE_AGENT and task.status.message.task_id == task.id
        said = task.status.message.metadata.fields["agentvault"].struct_value.fields
        assert said["sender"].struct_value.fields["agent_id"].string_value == bob.id
        assert "principal_id" not in said["sender"].struct_value.fields
        # The task is the mesh message: sent by the verified caller, to the path's agent, in the A2A context.
        [got] = responder.received
        assert (got.id, got.sender.agent_id, got.recipient.agent_id) == (task.id, alice.id, bob.id)
        assert got.conversation_id == "conv-a2a-1" and got.idempotency_key == request.message.message_id
        # A retried send (same messageId) is the same message, answered with the reply it already has.
        [again] = await send(client, request)
        assert again.task.id == task.id and answer_text(again.task) == "re: hello bob"
        assert len(responder.received) == 1
        # GetTask reads it again later; the reply was not used up.
        for _ in range(2):
            read = await client.get_task(a2a.GetTaskRequest(id=task.id))
            assert read.status.state == a2a.TASK_STATE_COMPLETED and answer_text(read) == "re: hello bob"

        # return_immediately: the task as it is now (submitted); GetTask finds the answer once it came.
        quick = text_request("be quick")
        quick.configuration.return_immediately = True
        [event] = await send(client, quick)
        assert event.task.status.state in (a2a.TASK_STATE_SUBMITTED, a2a.TASK_STATE_WORKING)

        async def answered() -> None:
            read = await client.get_task(a2a.GetTaskRequest(id=event.task.id))
            assert read.status.state == a2a.TASK_STATE_COMPLETED and answer_text(read) == "re: be quick"

        await eventually(answered, 10)
        with pytest.raises(a2a_errors.TaskNotCancelableError):
            await client.cancel_task(a2a.CancelTaskRequest(id=task.id))
        with pytest.raises(a2a_errors.TaskNotFoundError):
            await client.get_task(a2a.GetTaskRequest(id=str(uuid.uuid4())))
        await client.close()


async def test_a_streaming_send_follows_the_task_to_its_answer(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    async with http_as(alice) as http, answering(net, bob, hold=True) as responder:
        card = await card_of(net, http, bob)
        assert card.capabilities.streaming
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
        events: list[a2a.StreamResponse] = []
        async for event in client.send_message(text_request("stream to bob")):
            events.append(event)
            kind = event.WhichOneof("payload")
            if kind == "status_update" and event.status_update.status.state == a2a.TASK_STATE_WORKING:
                # Bob took it (delivered); only now does he answer, so the stream showed him working first. His copy
                # comes on his own stream, which may reach this process a moment after the status did.
                await asyncio.wait_for(responder.taken.wait(), 10)
                responder.go.set()
        kinds = [e.WhichOneof("payload") for e in events]
        assert kinds[0] == "task" and events[0].task.status.state == a2a.TASK_STATE_SUBMITTED
        states = [e.status_update.status.state for e in events[1:]]
        assert kinds[1:] == ["status_update"] * len(states)
        assert a2a.TASK_STATE_WORKING in states and states[-1] == a2a.TASK_STATE_COMPLETED
        final = events[-1].status_update
        assert final.task_id == events[0].task.id and final.status.message.parts[0].text == "re: stream to bob"
        read = await client.get_task(a2a.GetTaskRequest(id=final.task_id))
        assert answer_text(read) == "re: stream to bob"
        await client.close()


async def test_an_a2a_0_3_client_is_served_too(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    async with http_as(alice) as http, answering(net, bob):
        card = await card_of(net, http, bob)
        legacy = a2a.AgentCard()
        legacy.CopyFrom(card)
        del legacy.supported_interfaces[:]
        legacy.supported_interfaces.extend(i for i in card.supported_interfaces if i.protocol_version == "0.3")
        for streaming in (False, True):
            legacy.capabilities.streaming = streaming
            client = ClientFactory(ClientConfig(httpx_client=http, streaming=streaming)).create(legacy)
            assert type(client._transport).__name__ == "CompatJsonRpcTransport"
            events = await send(client, text_request(f"old school {streaming}"))
            last = events[-1]
            task = last.task if last.HasField("task") else None
            status = task.status if task is not None else last.status_update.status
            assert status.state == a2a.TASK_STATE_COMPLETED, events
            assert status.message.parts[0].text == f"re: old school {streaming}"
            task_id = task.id if task is not None else last.status_update.task_id
            read = await client.get_task(a2a.GetTaskRequest(id=task_id))
            assert read.status.state == a2a.TASK_STATE_COMPLETED
            await client.close()


async def test_callers_without_credentials_and_messages_policies_forbid_are_refused(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    closed = await local_agent(net, tags=["closed"])
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "SendMessage",
        "params": {"message": {"messageId": "m-1", "role": "ROLE_USER", "parts": [{"text": "hi"}]}},
    }
    async with http_as(None) as anonymous:
        answer = await anonymous.post(endpoint(net, bob), json=body)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
        error = answer.json()
        assert error["id"] == 7 and error["error"]["code"] == -32000 and "authentication" in error["error"]["message"]
        # A credential the mesh does not know is the messaging service's 401, told the same way.
        answer = await anonymous.post(endpoint(net, bob), json=body, headers={"Authorization": "Bearer nope"})
        assert answer.status_code == 401 and answer.json()["error"]["code"] == -32000
        card = await card_of(net, anonymous, bob)  # the card of an agent shared in the mesh is public
        client = ClientFactory(ClientConfig(httpx_client=anonymous, streaming=False)).create(card)
        with pytest.raises(A2AClientError, match="401"):
            await send(client, text_request("anyone there?"))
        # Malformed requests are JSON-RPC errors, never a 500.
        for bad, code in (
            (b"{", -32700),
            (b"[]", -32600),
            (b'{"jsonrpc": "2.0", "id": 1, "method": "Nope"}', -32601),
        ):
            answer = await anonymous.post(endpoint(net, bob), content=bad)
            assert (answer.status_code, answer.json()["error"]["code"]) == (200, code), bad
    got = await net.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(), metadata=bob.md)
    assert list(got.deliveries) == []

    async with http_as(alice) as http:
        for streaming in (False, True):
            card = await card_of(net, http, closed)
            client = ClientFactory(ClientConfig(httpx_client=http, streaming=streaming)).create(card)
            with pytest.raises(A2AClientError, match="closed agents take no messages"):
                await send(client, text_request("let me in"))
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(await card_of(net, http, bob))
        # Params that are not what the method takes are JSON-RPC errors too (never a 500).
        for params, method, code in (
            ({"message": "x"}, "SendMessage", -32602),
            ({"message": {"parts": "x"}}, "message/send", -32602),
            ({}, "GetTask", -32602),
            ({"id": "not-a-uuid"}, "GetTask", -32001),
            ({"id": "x"}, "tasks/get", -32001),
            ({}, "ListTasks", -32004),
        ):
            answer = await http.post(
                endpoint(net, bob), json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
            )
            assert (answer.status_code, answer.json()["error"]["code"]) == (200, code), (method, params, answer.text)
        nameless = text_request("no id")
        nameless.message.message_id = ""
        with pytest.raises(a2a_errors.InvalidParamsError, match="messageId"):
            await send(client, nameless)
