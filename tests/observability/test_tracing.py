"""One OpenTelemetry trace across processes and meshes, received by a real OTLP receiver on loopback: a federated
search (edge -> discovery -> registry, and discovery -> the peer mesh's edge -> its registry) and a message send
through the edge with its push delivery (SendMessage -> the delivery worker -> the agent's webhook)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from aiohttp import web

from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, auth, eventually
from ..federation.conftest import add_peer, admin, call, issue_credential, mesh_env, register, unique_word
from ..loopback import serve
from ..messaging.conftest import MESSAGING_ENV, POLICIES, Net, local_agent, policy
from . import otlp_receiver
from .otlp_receiver import CLIENT, CONSUMER, SERVER, Receiver, Span


@dataclass
class Pair:
    a: MeshHandle
    b: MeshHandle
    receiver: Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from otlp_receiver.running()


def otel_env(receiver: Receiver, mesh: str, protocol: str) -> dict[str, str]:
    port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    return {
        # Only the standard variables: the SDK reads them (endpoint, protocol, resource, batch delay).
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_RESOURCE_ATTRIBUTES": f"mesh={mesh}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="module")
def pair(mesh_factory: MeshFactory, receiver: Receiver) -> Iterator[Pair]:
    edge = free_port()
    a = mesh_factory(
        name="traced_a",
        env={
            **mesh_env("traced-a"),
            **MESSAGING_ENV,
            **otel_env(receiver, "a", "grpc"),
            "EDGE_PORT": str(edge),
            "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        },
    )
    # B exports over OTLP/HTTP: both of the SDK's protocols are exercised.
    b = mesh_factory(name="traced_b", env={**mesh_env("traced-b"), **otel_env(receiver, "b", "http/protobuf")})
    yield Pair(a, b, receiver)
    # Stopped while the receiver still listens: the services' last spans are exported at exit, not retried against
    # a closed port until the exporter's timeout (which made this module's teardown last a minute).
    for handle in (a, b):
        handle.mesh.stop()


@pytest.fixture(scope="module")
async def peered(pair: Pair, http: aiohttp.ClientSession) -> Pair:
    # B twice, over both federation channels: gRPC (its FederationService) and REST (its edge).
    token = await issue_credential(http, pair.b, "traced-a")
    await add_peer(http, pair.a, "Traced B", pair.b.url(), token)
    rest_token = await issue_credential(http, pair.b, "traced-a-rest")
    # Another URL of the same mesh: a peer's registry_url is unique.
    rest_url = pair.b.url().replace("127.0.0.1", "localhost")
    await add_peer(http, pair.a, "Traced B REST", rest_url, rest_token, protocol="rest")
    return pair


def new_trace() -> tuple[str, str, str]:
    """A caller's own trace: (trace id, its span id, the traceparent header naming them)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def one(spans: list[Span], mesh: str, service: str, kind: int, name: str = "") -> Span:
    found = [s for s in spans if (s.mesh, s.service, s.kind) == (mesh, service, kind) and name in s.name]
    assert found, f"no {kind} span {name!r} of {mesh}/{service} in {[(s.mesh, s.service, s.name) for s in spans]}"
    return found[0]


def assert_linked(spans: list[Span], root_parent: str) -> None:
    """Every span's parent is in the trace (or is the caller's span): one tree, nothing dangling."""
    ids = {s.span_id for s in spans} | {root_parent}
    dangling = [(s.mesh, s.service, s.name) for s in spans if s.parent_id not in ids]
    assert not dangling, dangling


async def test_a_federated_search_is_one_trace_across_both_meshes(peered: Pair, http: aiohttp.ClientSession) -> None:
    word = unique_word()
    await register(http, peered.b, f"Shared {word}", "federated")
    trace_id, caller_span, traceparent = new_trace()
    reply = await call(
        http,
        "GET",
        peered.a.url("/api/v1/discovery/agents"),
        headers={**admin(peered.a), "traceparent": traceparent},
        params={"include_federated": "true", "search": word},
    )
    assert {agent["name"] for agent in reply["agents"]} == {f"Shared {word}"}

    found: list[list[Span]] = []

    async def whole() -> None:
        spans = peered.receiver.trace(trace_id)
        # Each process exports its own batch: wait for the span each one ends last.
        one(spans, "a", "edge", SERVER)
        one(spans, "b", "edge", SERVER)
        one(spans, "b", "registry", SERVER, "FederationService/SearchAgents")
        found.append(spans)

    await eventually(whole, 15)
    spans = found[-1]
    edge_a = one(spans, "a", "edge", SERVER, "/api/v1/discovery/agents")
    discovery = one(spans, "a", "discovery", SERVER, "SearchAgents")
    registry_a = one(spans, "a", "registry", SERVER)
    grpc_call = one(spans, "a", "discovery", CLIENT, "FederationService/SearchAgents")
    rest_call = one(spans, "a", "discovery", CLIENT, "GET /api/v1/agents")
    registry_b = one(spans, "b", "registry", SERVER, "FederationService/SearchAgents")
    edge_b = one(spans, "b", "edge", SERVER, "/api/v1/agents")
    registry_b_rest = one(spans, "b", "registry", SERVER, "RegistryService")
    # Across processes, each server span's parent is its caller's span.
    assert edge_a.parent_id == caller_span
    assert discovery.parent_id == edge_a.span_id
    assert registry_a.parent_id == discovery.span_id
    assert grpc_call.parent_id == rest_call.parent_id == discovery.span_id
    assert (grpc_call.attributes["peer.name"], rest_call.attributes["peer.name"]) == ("Traced B", "Traced B REST")
    # Over the signed federation channel to the other mesh: the client span's id is the peer's server span's parent.
    assert registry_b.parent_id == grpc_call.span_id
    assert edge_b.parent_id == rest_call.span_id
    assert registry_b_rest.parent_id == edge_b.span_id
    assert_linked(spans, caller_span)


@pytest.fixture(scope="module")
async def net(peered: Pair) -> AsyncIterator[Net]:
    async with (
        grpc.aio.insecure_channel(peered.a.address("registry")) as reg,
        grpc.aio.insecure_channel(peered.a.address("messaging")) as msg,
    ):
        n = Net(
            peered.a,
            pb_grpc.RegistryServiceStub(reg),
            ipb_grpc.IdentityServiceStub(reg),
            ppb_grpc.PolicyServiceStub(reg),
            mpb_grpc.MessagingServiceStub(msg),
        )
        await policy(n, POLICIES[0])  # messages to untagged agents are allowed
        yield n


async def test_a_message_and_its_delivery_are_one_trace(peered: Pair, net: Net, http: aiohttp.ClientSession) -> None:
    pushed: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        pushed.append(dict(request.headers))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serve(app) as port:
        alice = await local_agent(net)
        bob = await local_agent(
            net, endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=f"http://127.0.0.1:{port}/hook")]
        )
        trace_id, caller_span, traceparent = new_trace()
        sent = await call(
            http,
            "POST",
            peered.a.url("/api/v1/messages"),
            headers={**auth(alice.token), "traceparent": traceparent},
            json={"recipient": {"agent_id": bob.id}, "parts": [{"text": "traced"}]},
        )
        message_id = sent["message"]["id"]
        found: list[list[Span]] = []

        async def delivered() -> None:
            assert pushed, "not delivered yet"
            spans = peered.receiver.trace(trace_id)
            deliver = one(spans, "a", "messaging", CONSUMER, "message.deliver")
            assert deliver.attributes["messaging.message.id"] == message_id
            one(spans, "a", "edge", SERVER)
            found.append(spans)

        await eventually(delivered, 15)
    spans = found[-1]
    edge = one(spans, "a", "edge", SERVER, "/api/v1/messages")
    send = one(spans, "a", "messaging", SERVER, "SendMessage")
    deliver = one(spans, "a", "messaging", CONSUMER, "message.deliver")
    assert edge.parent_id == caller_span
    assert send.parent_id == edge.span_id
    # Delivered later by the worker, from the traceparent stored with the message: a child of the send.
    assert deliver.parent_id == send.span_id
    assert_linked(spans, caller_span)
