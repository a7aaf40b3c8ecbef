"""A message's trace beyond the mesh, received by a real OTLP receiver on loopback: the push transports hand the
delivery span's traceparent to the agent (webhook, WebSocket frame, A2A call), a message to a peer mesh is one
trace across both meshes, and an inbox delivery (ReceiveMessages, StreamInbox, Converse) is a span of it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, auth, eventually
from ..federation.conftest import add_peer, call, issue_credential
from ..loopback import serve
from ..messaging.a2a_agent import running_agent
from ..messaging.conftest import MESSAGING_ENV, POLICIES, LocalAgent, Net, local_agent, policy
from . import otlp_receiver
from .otlp_receiver import CLIENT, CONSUMER, SERVER, Receiver, Span
from .test_tracing import assert_linked, new_trace, one, otel_env


@dataclass
class Meshes:
    a: Net
    b: Net
    receiver: Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from otlp_receiver.running()


def _env(receiver: Receiver, name: str, short: str, protocol: str) -> dict[str, str]:
    edge = free_port()
    return {
        **MESSAGING_ENV,
        **otel_env(receiver, short, protocol),
        "EDGE_PORT": str(edge),
        "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        "MESSAGING_METRICS_PORT": str(free_port()),
        "FEDERATION_REGISTRY_NAME": name,
    }


def _net(mesh: MeshHandle, reg: grpc.aio.Channel, msg: grpc.aio.Channel) -> Net:
    return Net(
        mesh,
        pb_grpc.RegistryServiceStub(reg),
        ipb_grpc.IdentityServiceStub(reg),
        ppb_grpc.PolicyServiceStub(reg),
        mpb_grpc.MessagingServiceStub(msg),
    )


@pytest.fixture(scope="module")
async def meshes(mesh_factory: MeshFactory, receiver: Receiver, http: aiohttp.ClientSession) -> AsyncIterator[Meshes]:
    a = mesh_factory(name="msgtrace_a", env=_env(receiver, "mesh-a", "a", "grpc"))
    b = mesh_factory(name="msgtrace_b", env=_env(receiver, "mesh-b", "b", "http/protobuf"))
    # A sends to B: B's credential for A, named as A's peer entry for B names it.
    await add_peer(http, a, "mesh-b", b.url(), await issue_credential(http, b, "mesh-a"))
    async with (
        grpc.aio.insecure_channel(a.address("registry")) as a_reg,
        grpc.aio.insecure_channel(a.address("messaging")) as a_msg,
        grpc.aio.insecure_channel(b.address("registry")) as b_reg,
        grpc.aio.insecure_channel(b.address("messaging")) as b_msg,
    ):
        found = Meshes(_net(a, a_reg, a_msg), _net(b, b_reg, b_msg), receiver)
        await policy(found.a, POLICIES[0])  # messages to untagged agents are allowed, in both meshes
        await policy(found.b, POLICIES[0])
        yield found
    # Stopped while the receiver still listens: the services' last spans are exported at exit, not retried against
    # a closed port until the exporter's timeout (which made this module's teardown last a minute).
    for handle in (a, b):
        handle.mesh.stop()


def parsed(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent."""
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16, traceparent
    return trace_id, span_id


async def send(
    http: aiohttp.ClientSession, mesh: MeshHandle, sender: LocalAgent, recipient: dict[str, str], text: str
) -> tuple[str, str, str]:
    """A message sent through the edge in a trace of the caller's: (message id, trace id, the caller's span id)."""
    trace_id, caller_span, traceparent = new_trace()
    sent = await call(
        http,
        "POST",
        mesh.url("/api/v1/messages"),
        headers={**auth(sender.token), "traceparent": traceparent},
        # Role "user": an A2A agent requires one (the others ignore it).
        json={"recipient": recipient, "parts": [{"text": text}], "role": "user"},
    )
    return str(sent["message"]["id"]), trace_id, caller_span


async def spans_with(receiver: Receiver, trace_id: str, *wanted: tuple[str, str, int, str]) -> list[Span]:
    """The trace's spans once each (mesh, service, kind, name) wanted is among them (each process exports its own
    batches)."""
    found: list[list[Span]] = []

    async def complete() -> None:
        spans = receiver.trace(trace_id)
        for mesh, service, kind, name in wanted:
            one(spans, mesh, service, kind, name)
        found.append(spans)

    await eventually(complete, 20)
    return found[-1]


@dataclass
class Agents:
    """A webhook, a WebSocket agent and what each received (the webhook's headers, the WebSocket's frames)."""

    port: int = 0
    hooks: dict[str, dict[str, str]] = field(default_factory=dict)  # message id -> request headers
    frames: dict[str, dict[str, Any]] = field(default_factory=dict)  # message id -> frame

    async def hook(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.hooks[body["id"]] = {k.lower(): v for k, v in request.headers.items()}
        return web.Response(status=204)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for frame in socket:
            if frame.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(frame.data)
                self.frames[data["message"]["id"]] = data
                await socket.send_json({"type": "ack", "id": data["message"]["id"]})
        return socket


@pytest.fixture(scope="module")
async def agents() -> AsyncIterator[Agents]:
    found = Agents()
    app = web.Application()
    app.router.add_post("/hook", found.hook)
    app.router.add_get("/ws", found.ws)
    async with serve(app) as found.port:
        yield found


async def test_push_transports_hand_the_delivery_span_to_the_agent(
    meshes: Meshes, agents: Agents, http: aiohttp.ClientSession
) -> None:
    a = meshes.a
    alice = await local_agent(a)
    base = f"127.0.0.1:{agents.port}"
    webhook = await local_agent(a, endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=f"http://{base}/hook")])
    socket = await local_agent(a, endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_WEBSOCKET, url=f"ws://{base}/ws")])
    async with running_agent() as a2a_agent:
        speaker = await local_agent(a, endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_A2A, url=a2a_agent.endpoint)])
        sends = {
            name: await send(http, a.mesh, alice, {"agent_id": agent.id}, "echo traced")
            for name, agent in (("http", webhook), ("websocket", socket), ("a2a", speaker))
        }

        received: dict[str, str] = {}

        async def all_pushed() -> None:
            for name, (message_id, _, _) in sends.items():
                if name == "http":
                    assert message_id in agents.hooks, "webhook not called yet"
                    received[name] = agents.hooks[message_id]["traceparent"]
                elif name == "websocket":
                    assert message_id in agents.frames, "no frame yet"
                    received[name] = agents.frames[message_id]["traceparent"]
                else:
                    assert a2a_agent.received, "no A2A call yet"
                    received[name] = a2a_agent.received[-1].headers["traceparent"]

        await eventually(all_pushed, 20)

    for name, (message_id, trace_id, caller_span) in sends.items():
        spans = await spans_with(
            meshes.receiver, trace_id, ("a", "edge", SERVER, ""), ("a", "messaging", CONSUMER, "message.deliver")
        )
        deliver = one(spans, "a", "messaging", CONSUMER, "message.deliver")
        assert deliver.attributes == {"messaging.message.id": message_id, "messaging.transport": name}
        # The agent is handed the delivery span's context: its own spans are children of the delivery.
        assert parsed(received[name]) == (trace_id, deliver.span_id), name
        send_span = one(spans, "a", "messaging", SERVER, "SendMessage")
        assert deliver.parent_id == send_span.span_id
        assert_linked(spans, caller_span)


async def test_a_message_to_a_peer_mesh_is_one_trace_across_both(
    meshes: Meshes, agents: Agents, http: aiohttp.ClientSession
) -> None:
    alice = await local_agent(meshes.a)
    # B's agent takes its messages by webhook: B's delivery span, in the same trace, is handed to it.
    bob = await local_agent(
        meshes.b,
        sharing=pb.SHARING_FEDERATED,
        endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=f"http://127.0.0.1:{agents.port}/hook")],
    )
    got = await meshes.b.registry.GetAgent(pb.GetAgentRequest(id=bob.id), metadata=meshes.b.admin)
    message_id, trace_id, caller_span = await send(
        http, meshes.a.mesh, alice, {"agent_id": bob.id, "did": got.did, "mesh": "mesh-b"}, "across"
    )

    async def pushed() -> None:
        assert message_id in agents.hooks, "not delivered in B yet"

    await eventually(pushed, 20)
    spans = await spans_with(
        meshes.receiver,
        trace_id,
        ("a", "edge", SERVER, "/api/v1/messages"),
        ("a", "messaging", CLIENT, "POST /api/v1/federation/messages"),
        ("b", "edge", SERVER, "/api/v1/federation/messages"),
        ("b", "messaging", SERVER, "DeliverFederatedMessage"),
        ("b", "messaging", CONSUMER, "message.deliver"),
    )
    edge_a = one(spans, "a", "edge", SERVER, "/api/v1/messages")
    send_a = one(spans, "a", "messaging", SERVER, "SendMessage")
    deliver_a = one(spans, "a", "messaging", CONSUMER, "message.deliver")
    call_a = one(spans, "a", "messaging", CLIENT, "POST /api/v1/federation/messages")
    edge_b = one(spans, "b", "edge", SERVER, "/api/v1/federation/messages")
    rpc_b = one(spans, "b", "messaging", SERVER, "FederatedMessagingService/DeliverFederatedMessage")
    deliver_b = one(spans, "b", "messaging", CONSUMER, "message.deliver")
    assert edge_a.parent_id == caller_span
    assert send_a.parent_id == edge_a.span_id
    assert deliver_a.parent_id == send_a.span_id
    assert deliver_a.attributes["messaging.transport"] == "federation"
    assert call_a.parent_id == deliver_a.span_id and call_a.attributes["peer.name"] == "mesh-b"
    # Over the signed channel to the peer's edge, then in B: its RPC, and its own delivery later, from the
    # traceparent B stored with the message.
    assert edge_b.parent_id == call_a.span_id
    assert rpc_b.parent_id == edge_b.span_id
    assert deliver_b.parent_id == rpc_b.span_id
    assert deliver_b.attributes == {"messaging.message.id": message_id, "messaging.transport": "http"}
    assert parsed(agents.hooks[message_id]["traceparent"]) == (trace_id, deliver_b.span_id)
    assert_linked(spans, caller_span)


async def test_an_inbox_delivery_is_a_span_of_the_send_linked_to_the_receive(
    meshes: Meshes, http: aiohttp.ClientSession
) -> None:
    a = meshes.a
    alice = await local_agent(a)
    readers = {name: await local_agent(a) for name in ("ReceiveMessages", "StreamInbox", "Converse")}
    sends = {name: await send(http, a.mesh, alice, {"agent_id": r.id}, "inbox") for name, r in readers.items()}
    receives = {name: new_trace() for name in readers}  # each receive call in a trace of its own

    def md(name: str) -> list[tuple[str, str]]:
        return [*readers[name].md, ("traceparent", receives[name][2])]

    got = await a.messaging.ReceiveMessages(
        mpb.ReceiveMessagesRequest(max_messages=10, wait_seconds=10), metadata=md("ReceiveMessages")
    )
    assert [d.message.id for d in got.deliveries] == [sends["ReceiveMessages"][0]]
    stream = a.messaging.StreamInbox(mpb.StreamInboxRequest(), metadata=md("StreamInbox"))
    first = await stream.read()
    assert first.message.id == sends["StreamInbox"][0]
    stream.cancel()

    done = asyncio.Event()

    async def subscribe() -> AsyncIterator[mpb.ConverseRequest]:
        yield mpb.ConverseRequest(request_id="s", subscribe=mpb.StreamInboxRequest())
        await done.wait()  # the stream stays open (a half-closed one ends) until the delivery came

    conversation = a.messaging.Converse(subscribe(), metadata=md("Converse"))
    delivered = []
    async for answer in conversation:
        if answer.HasField("delivery"):
            delivered.append(answer.delivery.message.id)
            break
    conversation.cancel()
    done.set()
    assert delivered == [sends["Converse"][0]]

    for name, (message_id, trace_id, caller_span) in sends.items():
        spans = await spans_with(
            meshes.receiver, trace_id, ("a", "edge", SERVER, ""), ("a", "messaging", CONSUMER, "message.receive")
        )
        handed = one(spans, "a", "messaging", CONSUMER, "message.receive")
        assert handed.attributes == {"messaging.message.id": message_id, "messaging.transport": "inbox"}
        # A child of the send, however much later the receiver came for it ...
        assert handed.parent_id == one(spans, "a", "messaging", SERVER, "SendMessage").span_id, name
        assert_linked(spans, caller_span)
        # ... and linked to the receive call that handed it over, which is in the receiver's own trace.
        receive_trace, receive_caller, _ = receives[name]
        receive = await spans_with(meshes.receiver, receive_trace, ("a", "messaging", SERVER, name))
        call_span = one(receive, "a", "messaging", SERVER, name)
        assert call_span.parent_id == receive_caller
        assert handed.links == (call_span.span_id,), name
