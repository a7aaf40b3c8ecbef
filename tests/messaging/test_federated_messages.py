"""Messages across meshes: two real meshes, peered both ways through their edges, exchange messages; each applies
its own policy; statuses and replies come back; a "peer" that misbehaves is refused."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from agentvault.common import signing
from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, eventually
from ..federation.conftest import add_peer, issue_credential
from .conftest import MESSAGING_ENV, POLICIES, LocalAgent, Net, local_agent, policy

PATH = "/api/v1/federation/messages"


@dataclass
class Pair:
    a: Net
    b: Net
    token_b_for_a: str  # what A presents to B
    token_a_for_b: str  # what B presents to A
    asker: LocalAgent  # an agent of A whose messages A's own policy asks about


def _env() -> dict[str, str]:
    edge = free_port()
    return {
        **MESSAGING_ENV,
        "EDGE_PORT": str(edge),
        "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        "MESSAGING_METRICS_PORT": str(free_port()),
    }


def _net(mesh: Any, reg: grpc.aio.Channel, msg: grpc.aio.Channel) -> Net:
    return Net(
        mesh,
        pb_grpc.RegistryServiceStub(reg),
        ipb_grpc.IdentityServiceStub(reg),
        ppb_grpc.PolicyServiceStub(reg),
        mpb_grpc.MessagingServiceStub(msg),
    )


@pytest.fixture(scope="module")
async def pair(mesh_factory: MeshFactory, http: aiohttp.ClientSession) -> AsyncIterator[Pair]:
    a = mesh_factory(name="fedmsg_a", env={**_env(), "FEDERATION_REGISTRY_NAME": "mesh-a"})
    b = mesh_factory(name="fedmsg_b", env={**_env(), "FEDERATION_REGISTRY_NAME": "mesh-b"})
    # Peered both ways, each peer named as the credential issued to it (as the invitation handshake does).
    token_b_for_a = await issue_credential(http, b, "mesh-a")
    token_a_for_b = await issue_credential(http, a, "mesh-b")
    await add_peer(http, a, "mesh-b", b.url(), token_b_for_a)
    await add_peer(http, b, "mesh-a", a.url(), token_a_for_b)
    async with (
        grpc.aio.insecure_channel(a.address("registry")) as a_reg,
        grpc.aio.insecure_channel(a.address("messaging")) as a_msg,
        grpc.aio.insecure_channel(b.address("registry")) as b_reg,
        grpc.aio.insecure_channel(b.address("messaging")) as b_msg,
    ):
        net_a = _net(a, a_reg, a_msg)
        asker = await local_agent(net_a)
        p = Pair(net_a, _net(b, b_reg, b_msg), token_b_for_a, token_a_for_b, asker)
        # A lets its agents send anywhere, but asks about the asker's messages to mesh-b; B asks for "guarded"
        # agents and refuses "closed" ones.
        await policy(
            p.a,
            'permit(principal, action == Action::"message.send", resource) '
            f'unless {{ resource.tags.contains("guarded") || principal == Caller::Agent::"{asker.id}" }};',
        )
        await policy(
            p.a,
            '@decision("ask") @reason("this agent\'s messages to mesh-b are approved first")\n'
            f'permit(principal == Caller::Agent::"{asker.id}", action == Action::"message.send", resource) '
            'when { resource.mesh == "mesh-b" };',
        )
        for text in POLICIES:
            await policy(p.b, text)
        yield p


async def _remote(n: Net, agent: LocalAgent, mesh: str) -> mpb.Party:
    """How a sender in another mesh names `agent`: its id and DID, and the peer's name there."""
    got = await n.registry.GetAgent(pb.GetAgentRequest(id=agent.id), metadata=n.admin)
    return mpb.Party(agent_id=agent.id, did=got.did, mesh=mesh)


async def _federated(n: Net, **fields: Any) -> LocalAgent:
    return await local_agent(n, sharing=pb.SHARING_FEDERATED, **fields)


async def _status(n: Net, message_id: str, *expected: str) -> mpb.Message:
    found: list[mpb.Message] = []

    async def check() -> None:
        message = await n.messaging.GetMessage(mpb.GetMessageRequest(id=message_id), metadata=n.admin)
        assert message.status in expected, (message.status, message.status_reason)
        found.append(message)

    await eventually(check, 20)
    return found[-1]


async def _receive(n: Net, agent: LocalAgent, message_id: str) -> mpb.Delivery:
    for _ in range(20):
        got = await n.messaging.ReceiveMessages(
            mpb.ReceiveMessagesRequest(max_messages=10, wait_seconds=1), metadata=agent.md
        )
        for delivery in got.deliveries:
            if delivery.message.id == message_id:
                return delivery
    raise AssertionError(f"message {message_id} never reached the inbox")


async def test_message_to_a_peer_agent_is_delivered_acknowledged_and_answered(pair: Pair) -> None:
    sender = await local_agent(pair.a)
    recipient = await _federated(pair.b)
    to = await _remote(pair.b, recipient, "mesh-b")
    sent = await pair.a.messaging.SendMessage(
        mpb.SendMessageRequest(message=mpb.Message(recipient=to, parts=[mpb.Part(text="hello B")])),
        metadata=sender.md,
    )
    message_id = sent.message.id
    assert sent.message.status == "accepted" and sent.message.transport == "federation"
    assert sent.message.recipient.mesh == "mesh-b"

    delivery = await _receive(pair.b, recipient, message_id)
    # The same id on both sides; the sender as the peer vouches for it, the peer named as B knows it.
    assert delivery.message.parts[0].text == "hello B"
    assert delivery.message.sender.kind == "peer" and delivery.message.sender.mesh == "mesh-a"
    assert delivery.message.sender.agent_id == sender.id
    await _status(pair.a, message_id, "delivered")
    await pair.b.messaging.AckMessage(
        mpb.AckMessageRequest(message_id=message_id, receipt=delivery.receipt), metadata=recipient.md
    )
    acked = await _status(pair.a, message_id, "acknowledged")
    assert "mesh-b" in acked.status_reason

    # B's agent answers; the reply crosses back and AwaitReply on A gets it, correlated.
    await pair.b.messaging.SendMessage(
        mpb.SendMessageRequest(message=mpb.Message(in_reply_to=message_id, parts=[mpb.Part(text="hi A")])),
        metadata=recipient.md,
    )
    answer = await pair.a.messaging.AwaitReply(
        mpb.AwaitReplyRequest(id=message_id, wait_seconds=20), metadata=sender.md
    )
    assert answer.HasField("reply"), "no reply came back"
    assert answer.reply.parts[0].text == "hi A" and answer.reply.in_reply_to == message_id
    assert answer.reply.correlation_id == sent.message.correlation_id
    assert answer.reply.sender.mesh == "mesh-b" and answer.reply.sender.agent_id == recipient.id


async def test_the_peers_policy_refuses_and_asks(pair: Pair) -> None:
    sender = await local_agent(pair.a)
    closed = await _federated(pair.b, tags=["closed"])
    guarded = await _federated(pair.b, tags=["guarded"])

    refused = await pair.a.messaging.SendMessage(
        mpb.SendMessageRequest(
            message=mpb.Message(recipient=await _remote(pair.b, closed, "mesh-b"), parts=[mpb.Part(text="no")])
        ),
        metadata=sender.md,
    )
    seen = await _status(pair.a, refused.message.id, "refused")
    assert "closed agents take no messages" in seen.status_reason

    asked = await pair.a.messaging.SendMessage(
        mpb.SendMessageRequest(
            message=mpb.Message(recipient=await _remote(pair.b, guarded, "mesh-b"), parts=[mpb.Part(text="may I")])
        ),
        metadata=sender.md,
    )
    await _status(pair.a, asked.message.id, "held")
    held = await pair.b.messaging.GetMessage(mpb.GetMessageRequest(id=asked.message.id), metadata=pair.b.admin)
    assert held.status == "held" and held.approval_id
    await pair.b.policies.ApproveApproval(
        ppb.ApproveApprovalRequest(id=held.approval_id, note="ok"), metadata=pair.b.admin
    )
    delivery = await _receive(pair.b, guarded, asked.message.id)
    assert delivery.message.parts[0].text == "may I"
    await _status(pair.a, asked.message.id, "delivered")


async def test_this_meshs_ask_holds_a_message_to_a_peer_until_its_sender_owner_approves(pair: Pair) -> None:
    recipient = await _federated(pair.b)
    sent = await pair.a.messaging.SendMessage(
        mpb.SendMessageRequest(
            message=mpb.Message(recipient=await _remote(pair.b, recipient, "mesh-b"), parts=[mpb.Part(text="out?")])
        ),
        metadata=pair.asker.md,
    )
    assert sent.message.status == "held" and sent.message.approval_id, sent.message
    assert sent.message.transport == "federation"
    # The approval names the sending agent (an agent of this mesh), whose owner answers; nothing left A meanwhile.
    approval = await pair.a.policies.GetApproval(
        ppb.GetApprovalRequest(id=sent.message.approval_id), metadata=pair.a.admin
    )
    assert approval.target_agent_id == pair.asker.id and approval.status == "pending"
    assert "mesh-b" in approval.purpose
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await pair.b.messaging.GetMessage(mpb.GetMessageRequest(id=sent.message.id), metadata=pair.b.admin)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    await pair.a.policies.ApproveApproval(
        ppb.ApproveApprovalRequest(id=sent.message.approval_id, note="ok"), metadata=pair.a.admin
    )
    delivery = await _receive(pair.b, recipient, sent.message.id)
    assert delivery.message.parts[0].text == "out?"
    await _status(pair.a, sent.message.id, "delivered")


async def test_a_peer_that_is_down_gets_retries_then_a_dead_letter(pair: Pair, http: aiohttp.ClientSession) -> None:
    await add_peer(http, pair.a.mesh, "mesh-down", f"http://127.0.0.1:{free_port()}", "avf_0123456789abcdef_x")
    sender = await local_agent(pair.a)
    sent = await pair.a.messaging.SendMessage(
        mpb.SendMessageRequest(
            message=mpb.Message(
                recipient=mpb.Party(agent_id=str(uuid.uuid4()), did="did:web:down.example:x", mesh="mesh-down"),
                parts=[mpb.Part(text="anyone?")],
            )
        ),
        metadata=sender.md,
    )
    dead = await _status(pair.a, sent.message.id, "dead_lettered")
    assert dead.attempts == int(MESSAGING_ENV["MESSAGING_MAX_ATTEMPTS"])
    assert "cannot reach peer mesh-down" in dead.status_reason
    # The service keeps serving: a peer that is not there at all is a clear error at once.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await pair.a.messaging.SendMessage(
            mpb.SendMessageRequest(
                message=mpb.Message(
                    recipient=mpb.Party(agent_id=str(uuid.uuid4()), did="did:web:x.example:y", mesh="mesh-nowhere"),
                    parts=[mpb.Part(text="?")],
                )
            ),
            metadata=sender.md,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "PEER_NOT_FOUND" in str(err.value.trailing_metadata())


def _signed(token: str, body: str, *, method: str = "POST", path: str = PATH, key: str | None = None) -> dict[str, str]:
    nonce = signing.new_nonce()
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        signing.NONCE_HEADER: nonce,
        signing.SIGNATURE_HEADER: signing.sign(method, path, body, key or token, nonce=nonce),
    }


async def _post(http: aiohttp.ClientSession, n: Net, headers: dict[str, str], body: str) -> tuple[int, Any]:
    async with http.post(n.mesh.url(PATH), data=body.encode(), headers=headers) as response:
        return response.status, await response.json(content_type=None)


def _reason(answer: Any) -> str:
    for detail in answer["error"]["details"]:
        if detail["@type"].endswith("ErrorInfo"):
            return str(detail["reason"])
    return ""


async def test_what_a_peer_sends_is_checked(pair: Pair, http: aiohttp.ClientSession) -> None:
    recipient = await _federated(pair.b)
    local_only = await local_agent(pair.b)  # not shared with peers
    token = pair.token_b_for_a

    def body(text: str, message_id: str, to: str = recipient.id) -> str:
        return json.dumps({"message": {"id": message_id, "recipient": {"agent_id": to}, "parts": [{"text": text}]}})

    first = body("one", str(uuid.uuid4()))
    status, answer = await _post(http, pair.b, _signed(token, first), first)
    assert status == 200 and answer["status"] == "accepted", answer

    # The same request again (its signature replayed): refused.
    headers = _signed(token, first)
    assert (await _post(http, pair.b, headers, first))[0] == 200  # a fresh signature: the same message, again
    status, answer = await _post(http, pair.b, headers, first)
    assert status == 401 and _reason(answer) == "SIGNATURE_REPLAYED"

    # Idempotent per id: the same content is the same message, other content under that id is a conflict.
    message_id = str(uuid.uuid4())
    status, answer = await _post(http, pair.b, _signed(token, body("x", message_id)), body("x", message_id))
    assert status == 200 and not answer.get("duplicate")
    status, answer = await _post(http, pair.b, _signed(token, body("x", message_id)), body("x", message_id))
    assert status == 200 and answer["duplicate"] is True
    status, answer = await _post(http, pair.b, _signed(token, body("y", message_id)), body("y", message_id))
    assert status == 409 and _reason(answer) == "MESSAGE_ID_TAKEN"

    some = body("z", str(uuid.uuid4()))
    # A bad signature, an unknown token, no signature, a credential that is no peer's.
    status, answer = await _post(http, pair.b, _signed(token, some, key=token + "x"), some)
    assert status == 401 and _reason(answer) == "SIGNATURE_INVALID"
    status, answer = await _post(http, pair.b, _signed("avf_0123456789abcdef_nope", some), some)
    assert status == 401 and _reason(answer) == "INVALID_CREDENTIAL"
    status, answer = await _post(
        http, pair.b, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, some
    )
    assert status == 401 and _reason(answer) == "SIGNATURE_MISSING"
    status, answer = await _post(http, pair.b, _signed(pair.b.mesh.admin_token, some), some)
    assert status == 403 and _reason(answer) == "PEER_REQUIRED"

    # Invalid and oversized messages; an agent not shared with peers is not found.
    bad = json.dumps({"message": {"id": str(uuid.uuid4()), "recipient": {"agent_id": recipient.id}, "parts": []}})
    status, answer = await _post(http, pair.b, _signed(token, bad), bad)
    assert status == 400, answer
    no_id = json.dumps({"message": {"recipient": {"agent_id": recipient.id}, "parts": [{"text": "x"}]}})
    status, answer = await _post(http, pair.b, _signed(token, no_id), no_id)
    assert status == 400 and "message.id" in json.dumps(answer)
    big = body("x" * 1_100_000, str(uuid.uuid4()))
    status, answer = await _post(http, pair.b, _signed(token, big), big)
    assert status == 413, answer
    hidden = body("psst", str(uuid.uuid4()), local_only.id)
    status, answer = await _post(http, pair.b, _signed(token, hidden), hidden)
    assert status == 404 and _reason(answer) == "AGENT_NOT_FOUND"

    # A peer asks only after its own messages.
    path = f"{PATH}/{message_id}"
    async with http.get(pair.b.mesh.url(path), headers=_signed(token, "", method="GET", path=path)) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "accepted"
    other = f"{PATH}/{uuid.uuid4()}"
    async with http.get(pair.b.mesh.url(other), headers=_signed(token, "", method="GET", path=other)) as response:
        assert response.status == 404


async def test_a_reply_to_a_message_never_sent_to_that_peer_is_refused(pair: Pair, http: aiohttp.ClientSession) -> None:
    sender = await local_agent(pair.a)
    local = await local_agent(pair.a)
    sent = await pair.a.messaging.SendMessage(
        mpb.SendMessageRequest(message=mpb.Message(recipient=local.party(), parts=[mpb.Part(text="local")])),
        metadata=sender.md,
    )
    forged = json.dumps(
        {"message": {"id": str(uuid.uuid4()), "in_reply_to": sent.message.id, "parts": [{"text": "x"}]}}
    )
    status, answer = await _post(http, pair.a, _signed(pair.token_a_for_b, forged), forged)
    assert status == 404 and _reason(answer) == "MESSAGE_NOT_FOUND"


async def test_a_federation_token_is_refused_outside_the_federation_api(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    """The registry now names the peer behind a federation token (the peer-facing service needs it); every other
    API of the services that ask it still refuses that token, signed or not."""
    recipient = await _federated(pair.b)
    token = pair.token_b_for_a
    body = json.dumps({"recipient": {"agent_id": recipient.id}, "parts": [{"text": "sneaky"}]})
    async with http.post(
        pair.b.mesh.url("/api/v1/messages"), data=body, headers={**_signed(token, body, path="/api/v1/messages")}
    ) as response:
        answer = await response.json()
        assert response.status == 401 and _reason(answer) == "FEDERATION_TOKEN_NOT_ACCEPTED", answer
    async with http.get(
        pair.b.mesh.url("/api/v1/discovery/agents?search=x"),
        headers=_signed(token, "", method="GET", path="/api/v1/discovery/agents?search=x"),
    ) as response:
        answer = await response.json()
        assert response.status == 401, answer  # (refused by the registry before it resolves the token)
