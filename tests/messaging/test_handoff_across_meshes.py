"""Session handoff across two real meshes: accepted (two-phase), rejected, expired, the peer's policy, integrity;
unclaimed messages following the session, "ask" held on either side, a session handed back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.common import signing
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import session_service_pb2 as spb
from agentvault.messaging.v1 import session_service_pb2_grpc as spb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.registry.v1 import registry_service_pb2 as pb

from ..conftest import MeshFactory, eventually
from ..federation.conftest import add_peer, issue_credential
from ..registry.test_jwt_callers import reason
from .conftest import POLICIES, LocalAgent, Net, local_agent, policy
from .test_federated_messages import _env, _net
from .test_handoff import HANDOFF_POLICIES, notices

PATH = "/api/v1/federation/handoffs"
# Mesh A's policy asks for an approval before a session this large leaves it (a way to have A, which does not know
# the target's tags, answer "ask"); mesh B asks for its "guarded" agents (HANDOFF_POLICIES[1]).
ASK_BYTES = 4096
A_HANDOFF_POLICIES = (
    'permit(principal, action == Action::"session.handoff", resource) '
    f'unless {{ resource.tags.contains("guarded") || context.payload_size >= {ASK_BYTES} }};',
    '@decision("ask") @reason("large sessions leave only when approved")\n'
    f'permit(principal, action == Action::"session.handoff", resource) when {{ context.payload_size >= {ASK_BYTES} }};',
)


@dataclass
class Side:
    net: Net
    sessions: spb_grpc.SessionServiceStub
    db: asyncpg.Connection


@dataclass
class Meshes:
    a: Side
    b: Side
    token_b_for_a: str  # what A presents to B
    token_a_for_b: str  # what B presents to A


@pytest.fixture(scope="module")
async def meshes(mesh_factory: MeshFactory, http: aiohttp.ClientSession) -> AsyncIterator[Meshes]:
    a = mesh_factory(name="xhandoff_a", env={**_env(), "FEDERATION_REGISTRY_NAME": "mesh-a"})
    b = mesh_factory(name="xhandoff_b", env={**_env(), "FEDERATION_REGISTRY_NAME": "mesh-b"})
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
        a_db = await asyncpg.connect(a.database_url)
        b_db = await asyncpg.connect(b.database_url)
        try:
            m = Meshes(
                Side(_net(a, a_reg, a_msg), spb_grpc.SessionServiceStub(a_msg), a_db),
                Side(_net(b, b_reg, b_msg), spb_grpc.SessionServiceStub(b_msg), b_db),
                token_b_for_a,
                token_a_for_b,
            )
            # Both meshes: messages allowed; handoffs allowed except to "closed" agents (deny); A asks for large
            # sessions, B for its "guarded" agents.
            for text in (POLICIES[0], *A_HANDOFF_POLICIES, HANDOFF_POLICIES[2]):
                await policy(m.a.net, text)
            for text in (POLICIES[0], *HANDOFF_POLICIES):
                await policy(m.b.net, text)
            yield m
        finally:
            await a_db.close()
            await b_db.close()


def state(**fields: Any) -> str:
    return json.dumps({"format_version": "1", **fields})


async def start(
    m: Meshes,
    *,
    deadline: int = 60,
    document: str = "",
    alice_sharing: int = pb.SHARING_LOCAL,
    before: Any = None,
    **target: Any,
) -> tuple[LocalAgent, LocalAgent, spb.Session, spb.Handoff]:
    """alice (mesh A) owns a session and offers it to bob (mesh B, shared with peers); `before(alice, session)`
    runs between the two."""
    alice = await local_agent(m.a.net, sharing=alice_sharing)
    bob = await local_agent(m.b.net, sharing=pb.SHARING_FEDERATED, **target)
    session = await m.a.sessions.CreateSession(
        spb.CreateSessionRequest(
            session=spb.Session(
                conversation_id=f"conv-{secrets.token_hex(6)}", state=document or state(step=1, who="alice")
            )
        ),
        metadata=alice.md,
    )
    if before is not None:
        await before(alice, session)
    offer = await m.a.sessions.InitiateHandoff(
        spb.InitiateHandoffRequest(
            session_id=session.id,
            target=spb.HandoffTarget(agent_id=bob.id, mesh="mesh-b"),
            deadline_seconds=deadline,
            note="over to you",
        ),
        metadata=alice.md,
    )
    return alice, bob, session, offer


async def wait_notice(n: Net, agent: LocalAgent, handoff_id: str, event: str) -> None:
    seen: dict[str, str] = {}

    async def told() -> None:
        seen.update(await notices(n, agent))
        assert seen.get(handoff_id) == event, seen

    await eventually(told, 15)


async def handoff_at(side: Side, who: LocalAgent, handoff_id: str, *statuses: str) -> spb.Handoff:
    found: list[spb.Handoff] = []

    async def check() -> None:
        got = await side.sessions.GetHandoff(spb.GetHandoffRequest(id=handoff_id), metadata=who.md)
        assert got.status in statuses, (got.status, got.status_reason)
        found.append(got)

    await eventually(check, 20)
    return found[-1]


async def accept_at_b(m: Meshes, bob: LocalAgent, handoff_id: str) -> spb.Handoff:
    got = await m.b.sessions.GetHandoff(spb.GetHandoffRequest(id=handoff_id), metadata=bob.md)
    return await m.b.sessions.AcceptHandoff(
        spb.AcceptHandoffRequest(id=handoff_id, state_sha256=got.state_sha256, signature=got.signature),
        metadata=bob.md,
    )


async def refused(call: Any, code: grpc.StatusCode, why: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert reason(caught.value)[0] == why, caught.value.details()


async def nothing_moved(m: Meshes, alice: LocalAgent, session: spb.Session) -> None:
    at_a = await m.a.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (at_a.owner_agent_id, at_a.owner_mesh, at_a.generation) == (alice.id, "", 1)
    assert at_a.state == session.state and not at_a.open_handoff_id
    assert await m.b.db.fetchval("SELECT count(*) FROM sessions WHERE id = $1::uuid", session.id) == 0
    # Still alice's: she can change it again.
    await m.a.sessions.UpdateSessionState(
        spb.UpdateSessionStateRequest(id=session.id, state=state(step=2)), metadata=alice.md
    )


async def test_accepted_across_meshes_moves_the_owner_and_the_conversation(meshes: Meshes) -> None:
    m = meshes
    alice, bob, session, offer = await start(m)
    assert offer.status == "offered" and offer.target.mesh == "mesh-b"
    await wait_notice(m.b.net, bob, offer.id, "offered")
    shown = await m.b.sessions.GetHandoff(spb.GetHandoffRequest(id=offer.id), metadata=bob.md)
    assert shown.state == session.state and shown.from_agent_id == alice.id and shown.note == "over to you"
    assert shown.state_sha256 == hashlib.sha256(session.state.encode()).hexdigest()
    # While the offer is open, the session stays alice's and takes no other offer nor change.
    other = await local_agent(m.a.net)
    await refused(
        m.a.sessions.InitiateHandoff(
            spb.InitiateHandoffRequest(session_id=session.id, target=spb.HandoffTarget(agent_id=other.id)),
            metadata=alice.md,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "HANDOFF_IN_PROGRESS",
    )
    still = await m.a.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (still.owner_agent_id, still.open_handoff_id) == (alice.id, offer.id)
    assert await m.b.db.fetchval("SELECT count(*) FROM sessions WHERE id = $1::uuid", session.id) == 0

    prepared = await accept_at_b(m, bob, offer.id)
    # Two-phase: accepted at B, but the session is A's until A commits.
    assert prepared.status in ("prepared", "accepted")
    done = await handoff_at(m.a, alice, offer.id, "accepted")
    assert done.target.mesh == "mesh-b"
    at_a = await m.a.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (at_a.owner_agent_id, at_a.owner_mesh, at_a.generation) == (bob.id, "mesh-b", 2)
    history = await m.a.sessions.ListSessionOwners(spb.ListSessionOwnersRequest(id=session.id), metadata=alice.md)
    assert [(o.agent_id, o.generation, o.HasField("until")) for o in history.owners] == [
        (alice.id, 1, True),
        (bob.id, 2, False),
    ]
    await wait_notice(m.a.net, alice, offer.id, "accepted")
    await refused(
        m.a.sessions.UpdateSessionState(
            spb.UpdateSessionStateRequest(id=session.id, state=state(step=9)), metadata=alice.md
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_THE_SESSION_OWNER",
    )

    # B's copy is live once A's commit is known there: bob reads and changes the state.
    await handoff_at(m.b, bob, offer.id, "accepted")
    await wait_notice(m.b.net, bob, offer.id, "accepted")
    at_b = await m.b.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=bob.md)
    assert (at_b.owner_agent_id, at_b.generation, at_b.state) == (bob.id, 2, session.state)
    assert at_b.conversation_id == session.conversation_id
    changed = await m.b.sessions.UpdateSessionState(
        spb.UpdateSessionStateRequest(id=session.id, state=state(step=2, who="bob")), metadata=bob.md
    )
    assert changed.state_version == at_b.state_version + 1

    # A's side writes to the conversation's former owner: the message goes to bob, in mesh B.
    carol = await local_agent(m.a.net)
    sent = await m.a.net.messaging.SendMessage(
        mpb.SendMessageRequest(
            message=mpb.Message(
                recipient=mpb.Party(agent_id=alice.id),
                conversation_id=session.conversation_id,
                parts=[mpb.Part(text="where is my refund?")],
            )
        ),
        metadata=carol.md,
    )
    assert sent.message.transport == "federation" and sent.message.recipient.mesh == "mesh-b"
    assert sent.message.recipient.agent_id == bob.id
    got: list[mpb.Message] = []

    async def reached() -> None:
        answer = await m.b.net.messaging.ReceiveMessages(
            mpb.ReceiveMessagesRequest(max_messages=10, wait_seconds=1), metadata=bob.md
        )
        got.extend(d.message for d in answer.deliveries if d.message.id == sent.message.id)
        assert got

    await eventually(reached, 20)
    assert got[0].parts[0].text == "where is my refund?" and got[0].conversation_id == session.conversation_id


async def test_rejected_across_meshes_moves_nothing(meshes: Meshes) -> None:
    m = meshes
    alice, bob, session, offer = await start(m)
    await wait_notice(m.b.net, bob, offer.id, "offered")
    rejected = await m.b.sessions.RejectHandoff(
        spb.RejectHandoffRequest(id=offer.id, reason="not my department"), metadata=bob.md
    )
    assert rejected.status == "rejected"
    done = await handoff_at(m.a, alice, offer.id, "rejected")
    assert "not my department" in done.status_reason and "mesh-b" in done.status_reason
    await wait_notice(m.a.net, alice, offer.id, "rejected")
    await refused(accept_at_b(m, bob, offer.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_NOT_OPEN")
    await nothing_moved(m, alice, session)


async def test_expired_across_meshes_moves_nothing_and_a_late_accept_is_refused(meshes: Meshes) -> None:
    m = meshes
    alice, bob, session, offer = await start(m, deadline=1)
    await handoff_at(m.a, alice, offer.id, "expired")
    await wait_notice(m.a.net, alice, offer.id, "expired")
    await refused(accept_at_b(m, bob, offer.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_NOT_OPEN")
    late = await m.b.sessions.GetHandoff(spb.GetHandoffRequest(id=offer.id), metadata=bob.md)
    assert late.status in ("expired", "aborted")
    await nothing_moved(m, alice, session)


async def test_an_acceptance_prepared_at_b_after_a_expired_is_rolled_back(meshes: Meshes) -> None:
    m = meshes
    alice, bob, session, offer = await start(m)
    await wait_notice(m.b.net, bob, offer.id, "offered")
    # A's deadline passes first (B's copy of it is still ahead: clocks or the wire disagree): A decides.
    await m.a.db.execute(
        "UPDATE session_handoffs SET deadline = now() - interval '1 second' WHERE id = $1::uuid", offer.id
    )
    try:
        answered = (await accept_at_b(m, bob, offer.id)).status
    except grpc.aio.AioRpcError as exc:  # B already heard of A's end
        answered = reason(exc)[0]
    assert answered in ("prepared", "HANDOFF_NOT_OPEN")
    await handoff_at(m.a, alice, offer.id, "expired")
    rolled_back = await handoff_at(m.b, bob, offer.id, "aborted")
    assert "mesh-a" in rolled_back.status_reason
    await nothing_moved(m, alice, session)


async def test_the_peers_policy_refuses_a_handoff(meshes: Meshes) -> None:
    m = meshes
    alice, bob, session, offer = await start(m, tags=["closed"])
    assert offer.status == "refused", offer
    assert "closed agents take no sessions" in offer.status_reason and "mesh-b" in offer.status_reason
    assert not await notices(m.b.net, bob)
    await nothing_moved(m, alice, session)


def _signed(token: str, body: str, path: str = PATH) -> dict[str, str]:
    nonce = signing.new_nonce()
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        signing.NONCE_HEADER: nonce,
        signing.SIGNATURE_HEADER: signing.sign("POST", path, body, token, nonce=nonce),
    }


async def test_a_tampered_state_is_refused_at_b(meshes: Meshes, http: aiohttp.ClientSession) -> None:
    m = meshes
    bob = await local_agent(m.b.net, sharing=pb.SHARING_FEDERATED)
    offered = state(balance=10)
    offer = {
        "id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "conversation_id": f"conv-{secrets.token_hex(6)}",
        "from_agent_id": str(uuid.uuid4()),
        "target_agent_id": bob.id,
        "state": state(balance=1_000_000),  # not the state its digest was made of
        "state_sha256": hashlib.sha256(offered.encode()).hexdigest(),
        "signature": secrets.token_hex(32),
        "generation": "1",
        "deadline": (datetime.now(UTC) + timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
    }
    body = json.dumps(offer)
    async with http.post(m.b.net.mesh.url(PATH), data=body, headers=_signed(m.token_b_for_a, body)) as response:
        answer = await response.json(content_type=None)
        assert response.status in (400, 412), (response.status, answer)
    reasons = [d.get("reason") for d in answer["error"]["details"] if d["@type"].endswith("ErrorInfo")]
    assert reasons == ["HANDOFF_INTEGRITY"], answer
    assert await m.b.db.fetchval("SELECT count(*) FROM incoming_handoffs WHERE id = $1::uuid", offer["id"]) == 0
    assert not await notices(m.b.net, bob)

    # The same offer, intact, is taken; its copy changed at rest in B is refused on acceptance, and A is told.
    alice, bob, session, real = await start(m)
    await wait_notice(m.b.net, bob, real.id, "offered")
    await m.b.db.execute(
        "UPDATE incoming_handoffs SET state = $2 WHERE id = $1::uuid", real.id, state(balance=1_000_000).encode()
    )
    await refused(accept_at_b(m, bob, real.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_INTEGRITY")
    done = await handoff_at(m.a, alice, real.id, "refused")
    assert "mesh-b" in done.status_reason
    await nothing_moved(m, alice, session)


async def test_an_acceptance_racing_a_cancel_has_one_outcome_on_both_sides(meshes: Meshes) -> None:
    """B's target accepts while A's owner withdraws: either A committed (then the cancel is refused and B's copy is
    live) or A cancelled (then B's acceptance is rolled back): never an owner on each side, never none."""
    m = meshes
    outcomes = set()
    for _ in range(4):
        alice, bob, session, offer = await start(m)
        await wait_notice(m.b.net, bob, offer.id, "offered")
        accepting = asyncio.ensure_future(accept_at_b(m, bob, offer.id))
        cancelling = asyncio.ensure_future(
            m.a.sessions.CancelHandoff(spb.CancelHandoffRequest(id=offer.id), metadata=alice.md)
        )
        await asyncio.gather(accepting, cancelling, return_exceptions=True)
        end = await handoff_at(m.a, alice, offer.id, "accepted", "cancelled")
        outcomes.add(end.status)
        at_a = await m.a.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
        if end.status == "accepted":
            assert (at_a.owner_agent_id, at_a.owner_mesh) == (bob.id, "mesh-b")
            await handoff_at(m.b, bob, offer.id, "accepted")
            at_b = await m.b.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=bob.md)
            assert at_b.owner_agent_id == bob.id
        else:
            assert (at_a.owner_agent_id, at_a.owner_mesh) == (alice.id, "")
            # Whatever bob's acceptance answered, B ends without the session.
            await handoff_at(m.b, bob, offer.id, "aborted")
            assert await m.b.db.fetchval("SELECT count(*) FROM sessions WHERE id = $1::uuid", session.id) == 0
    assert outcomes


async def receive_at(n: Net, who: LocalAgent, message_id: str) -> mpb.Message:
    """Polls `who`'s inbox until the message arrives (taken and acked)."""
    got: list[mpb.Message] = []

    async def reached() -> None:
        answer = await n.messaging.ReceiveMessages(
            mpb.ReceiveMessagesRequest(max_messages=10, wait_seconds=1), metadata=who.md
        )
        for d in answer.deliveries:
            await n.messaging.AckMessage(
                mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt), metadata=who.md
            )
            if d.message.id == message_id:
                got.append(d.message)
        assert got

    await eventually(reached, 30)
    return got[0]


async def test_unclaimed_messages_follow_the_session_to_the_peer(meshes: Meshes) -> None:
    m = meshes
    carol = await local_agent(m.a.net)
    waiting: list[mpb.Message] = []

    async def write_to_alice(alice: LocalAgent, session: spb.Session) -> None:
        sent = await m.a.net.messaging.SendMessage(
            mpb.SendMessageRequest(
                message=mpb.Message(
                    recipient=mpb.Party(agent_id=alice.id),
                    conversation_id=session.conversation_id,
                    correlation_id="case-42",
                    parts=[mpb.Part(text="still there?")],
                )
            ),
            metadata=carol.md,
        )
        assert sent.message.transport == "inbox"
        waiting.append(sent.message)

    alice, bob, session, offer = await start(m, before=write_to_alice)
    message = waiting[0]
    # Waiting, unclaimed, in alice's inbox at A while the offer is open.
    assert await m.a.db.fetchval("SELECT inbox FROM messages WHERE id = $1::uuid", message.id) == f"agent:{alice.id}"
    await handoff_at(m.b, bob, offer.id, "offered")
    await accept_at_b(m, bob, offer.id)
    await handoff_at(m.a, alice, offer.id, "accepted")
    # Re-addressed in A's commit: to bob, over the federated message route.
    row = await m.a.db.fetchrow(
        "SELECT inbox, transport, recipient_agent, recipient_mesh FROM messages WHERE id = $1::uuid", message.id
    )
    assert tuple(row) == ("mesh:mesh-b", "federation", bob.id, "mesh-b")
    got = await receive_at(m.b.net, bob, message.id)
    assert got.parts[0].text == "still there?"
    assert (got.conversation_id, got.correlation_id) == (session.conversation_id, "case-42")
    assert (got.sender.agent_id, got.sender.mesh) == (carol.id, "mesh-a")
    assert got.recipient.agent_id == bob.id
    # Once, with its id: not in alice's inbox any more, one copy at B.
    assert await m.b.db.fetchval("SELECT count(*) FROM messages WHERE id = $1::uuid", message.id) == 1
    answer = await m.a.net.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(max_messages=100), metadata=alice.md)
    assert message.id not in {d.message.id for d in answer.deliveries}


async def test_as_ask_holds_the_offer_until_approved(meshes: Meshes) -> None:
    m = meshes
    large = state(step=1, notes="x" * ASK_BYTES)
    alice, bob, session, held = await start(m, document=large)
    assert held.status == "held" and held.approval_id and not held.HasField("deadline"), held
    # Not sent to B while held.
    assert await m.b.db.fetchval("SELECT count(*) FROM incoming_handoffs WHERE id = $1::uuid", held.id) == 0
    approval = await m.a.net.policies.GetApproval(ppb.GetApprovalRequest(id=held.approval_id), metadata=m.a.net.admin)
    assert approval.action == "session.handoff" and approval.status == "pending"
    await m.a.net.policies.ApproveApproval(
        ppb.ApproveApprovalRequest(id=approval.id, note="ok"), metadata=m.a.net.admin
    )
    offered = await handoff_at(m.a, alice, held.id, "offered")
    assert offered.HasField("deadline")  # its clock started at the approval
    await handoff_at(m.b, bob, held.id, "offered")
    await accept_at_b(m, bob, held.id)
    await handoff_at(m.a, alice, held.id, "accepted")
    at_a = await m.a.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (at_a.owner_agent_id, at_a.owner_mesh, at_a.generation) == (bob.id, "mesh-b", 2)
    await handoff_at(m.b, bob, held.id, "accepted")

    # Denied: refused, nothing moves, B never heard of it.
    alice, bob, session, held = await start(m, document=large)
    assert held.status == "held"
    await m.a.net.policies.DenyApproval(ppb.DenyApprovalRequest(id=held.approval_id, note="no"), metadata=m.a.net.admin)
    await handoff_at(m.a, alice, held.id, "refused")
    await wait_notice(m.a.net, alice, held.id, "refused")
    assert await m.b.db.fetchval("SELECT count(*) FROM incoming_handoffs WHERE id = $1::uuid", held.id) == 0
    await nothing_moved(m, alice, session)


async def test_bs_ask_holds_the_offer_until_approved(meshes: Meshes) -> None:
    m = meshes
    alice, bob, session, offer = await start(m, tags=["guarded"])
    assert offer.status == "offered", offer  # A's policy allowed it; B's asks
    at_b = await handoff_at(m.b, bob, offer.id, "held")
    assert at_b.approval_id
    await refused(accept_at_b(m, bob, offer.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_NOT_OPEN")
    # A sees it held at B, still open at A.
    assert (await handoff_at(m.a, alice, offer.id, "offered")).status == "offered"
    await m.b.net.policies.ApproveApproval(
        ppb.ApproveApprovalRequest(id=at_b.approval_id, note="ok"), metadata=m.b.net.admin
    )
    await wait_notice(m.b.net, bob, offer.id, "offered")
    await accept_at_b(m, bob, offer.id)
    await handoff_at(m.a, alice, offer.id, "accepted")
    await handoff_at(m.b, bob, offer.id, "accepted")
    at_b_session = await m.b.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=bob.md)
    assert (at_b_session.owner_agent_id, at_b_session.generation) == (bob.id, 2)


async def test_bs_ask_held_past_as_deadline_ends_with_nothing_moved(meshes: Meshes) -> None:
    m = meshes
    alice, bob, session, offer = await start(m, deadline=2, tags=["guarded"])
    await handoff_at(m.a, alice, offer.id, "expired")
    await wait_notice(m.a.net, alice, offer.id, "expired")
    aborted = await handoff_at(m.b, bob, offer.id, "aborted")
    assert "mesh-a" in aborted.status_reason
    # B's approval, answered late, changes nothing.
    await m.b.net.policies.ApproveApproval(
        ppb.ApproveApprovalRequest(id=aborted.approval_id, note="too late"), metadata=m.b.net.admin
    )
    await refused(accept_at_b(m, bob, offer.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_NOT_OPEN")
    assert (await m.b.sessions.GetHandoff(spb.GetHandoffRequest(id=offer.id), metadata=bob.md)).status == "aborted"
    await nothing_moved(m, alice, session)


async def test_a_session_handed_back_from_b_to_a(meshes: Meshes, http: aiohttp.ClientSession) -> None:
    m = meshes
    alice, bob, session, offer = await start(m, alice_sharing=pb.SHARING_FEDERATED)
    await handoff_at(m.b, bob, offer.id, "offered")
    await accept_at_b(m, bob, offer.id)
    await handoff_at(m.b, bob, offer.id, "accepted")  # B's copy is live

    # B hands it back: a new handoff across meshes, from B, which A takes though it still holds the session's row.
    back = await m.b.sessions.InitiateHandoff(
        spb.InitiateHandoffRequest(
            session_id=session.id,
            target=spb.HandoffTarget(agent_id=alice.id, mesh="mesh-a"),
            state=state(step=3, who="bob"),
            note="back to you",
        ),
        metadata=bob.md,
    )
    assert back.status == "offered", back
    await wait_notice(m.a.net, alice, back.id, "offered")
    prepared = await m.a.sessions.AcceptHandoff(
        spb.AcceptHandoffRequest(
            id=back.id, state_sha256=hashlib.sha256(state(step=3, who="bob").encode()).hexdigest()
        ),
        metadata=alice.md,
    )
    assert prepared.status in ("prepared", "accepted")
    await handoff_at(m.b, bob, back.id, "accepted")
    await handoff_at(m.a, alice, back.id, "accepted")
    at_a = await m.a.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (at_a.owner_agent_id, at_a.owner_mesh, at_a.generation) == (alice.id, "", 3)
    assert at_a.state == state(step=3, who="bob")
    history = await m.a.sessions.ListSessionOwners(spb.ListSessionOwnersRequest(id=session.id), metadata=alice.md)
    assert [(o.agent_id, o.generation, o.HasField("until")) for o in history.owners] == [
        (alice.id, 1, True),
        (bob.id, 2, True),
        (alice.id, 3, False),
    ]
    at_b = await m.b.sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=bob.md)
    assert (at_b.owner_agent_id, at_b.owner_mesh, at_b.generation) == (alice.id, "mesh-a", 3)
    # Alice holds it again: she changes it.
    await m.a.sessions.UpdateSessionState(
        spb.UpdateSessionStateRequest(id=session.id, state=state(step=4)), metadata=alice.md
    )

    # The conversation's messages sent at A now go to alice, locally, also those written to bob.
    carol = await local_agent(m.a.net)
    for to in (alice.id, bob.id):
        sent = await m.a.net.messaging.SendMessage(
            mpb.SendMessageRequest(
                message=mpb.Message(
                    recipient=mpb.Party(agent_id=to),
                    conversation_id=session.conversation_id,
                    parts=[mpb.Part(text=f"to {to}")],
                )
            ),
            metadata=carol.md,
        )
        assert (sent.message.transport, sent.message.recipient.agent_id) == ("inbox", alice.id), sent.message
        assert not sent.message.recipient.mesh
        got = await receive_at(m.a.net, alice, sent.message.id)
        assert got.parts[0].text == f"to {to}"

    # A session id A holds for another owner (here: alice's, of this mesh) is still refused.
    mine = await m.a.sessions.CreateSession(
        spb.CreateSessionRequest(session=spb.Session(conversation_id=f"conv-{secrets.token_hex(6)}", state=state())),
        metadata=alice.md,
    )
    document = state(balance=10)
    claim = {
        "id": str(uuid.uuid4()),
        "session_id": mine.id,
        "conversation_id": mine.conversation_id,
        "from_agent_id": bob.id,
        "target_agent_id": alice.id,
        "state": document,
        "state_sha256": hashlib.sha256(document.encode()).hexdigest(),
        "signature": secrets.token_hex(32),
        "generation": "5",
        "deadline": (datetime.now(UTC) + timedelta(minutes=1)).isoformat().replace("+00:00", "Z"),
    }
    body = json.dumps(claim)
    async with http.post(m.a.net.mesh.url(PATH), data=body, headers=_signed(m.token_a_for_b, body)) as response:
        answer = await response.json(content_type=None)
        assert response.status == 200, answer
    assert answer["status"] == "refused" and "has a session" in answer["status_reason"], answer
    still = await m.a.sessions.GetSession(spb.GetSessionRequest(id=mine.id), metadata=alice.md)
    assert (still.owner_agent_id, still.owner_mesh, still.generation) == (alice.id, "", 1)
