"""Session handoff on a mesh of real processes: accepted, rejected, expired, raced, tampered, policy, REST."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.messaging.v1 import session_service_pb2 as spb
from agentvault.messaging.v1 import session_service_pb2_grpc as spb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, auth, eventually
from ..registry.test_jwt_callers import reason
from .conftest import MESSAGING_ENV, POLICIES, LocalAgent, Net, local_agent, policy, text_message

MAX_STATE = 64 * 1024  # below the edge's own body bound, so the service's answers
HANDOFF_POLICIES = (
    'permit(principal, action == Action::"session.handoff", resource) unless { resource.tags.contains("guarded") };',
    '@decision("ask") @reason("guarded agents take only approved sessions")\n'
    'permit(principal, action == Action::"session.handoff", resource) when { resource.tags.contains("guarded") };',
    '@reason("closed agents take no sessions")\n'
    'forbid(principal, action == Action::"session.handoff", resource) when { resource.tags.contains("closed") };',
)


@pytest.fixture(scope="module")
async def net(mesh_factory: MeshFactory) -> AsyncIterator[Net]:
    edge = free_port()
    env = {
        **MESSAGING_ENV,
        "EDGE_PORT": str(edge),
        "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        "MESSAGING_METRICS_PORT": str(free_port()),
        "MESSAGING_SESSION_MAX_BYTES": str(MAX_STATE),
    }
    mesh = mesh_factory(name="handoff", env=env)
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
        for text in (*POLICIES, *HANDOFF_POLICIES):
            await policy(n, text)
        yield n


@pytest.fixture(scope="module")
async def sessions(net: Net) -> AsyncIterator[spb_grpc.SessionServiceStub]:
    async with grpc.aio.insecure_channel(net.mesh.address("messaging")) as channel:
        yield spb_grpc.SessionServiceStub(channel)


@pytest.fixture(scope="module")
async def db(net: Net) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(net.mesh.database_url)
    try:
        yield conn
    finally:
        await conn.close()


def state(**fields: Any) -> str:
    return json.dumps({"format_version": "1", **fields})


async def new_session(s: spb_grpc.SessionServiceStub, owner: LocalAgent, **fields: Any) -> spb.Session:
    conversation = fields.pop("conversation_id", f"conv-{secrets.token_hex(6)}")
    return await s.CreateSession(
        spb.CreateSessionRequest(
            session=spb.Session(conversation_id=conversation, state=fields.pop("state", state(step=1)), **fields)
        ),
        metadata=owner.md,
    )


async def offer(
    s: spb_grpc.SessionServiceStub, owner: LocalAgent, session: spb.Session, to: LocalAgent, **fields: Any
) -> spb.Handoff:
    return await s.InitiateHandoff(
        spb.InitiateHandoffRequest(session_id=session.id, target=spb.HandoffTarget(agent_id=to.id), **fields),
        metadata=owner.md,
    )


async def accept(s: spb_grpc.SessionServiceStub, who: LocalAgent, handoff_id: str) -> spb.Handoff:
    """Accepts as a target does: reads the offer (state, digest, signature) and presents what it got."""
    got = await s.GetHandoff(spb.GetHandoffRequest(id=handoff_id), metadata=who.md)
    return await s.AcceptHandoff(
        spb.AcceptHandoffRequest(id=handoff_id, state_sha256=got.state_sha256, signature=got.signature),
        metadata=who.md,
    )


async def refused(call: Any, code: grpc.StatusCode, why: str) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    got, meta = reason(caught.value)
    assert got == why, (got, caught.value.details())
    return meta


async def notices(n: Net, agent: LocalAgent) -> dict[str, str]:
    """Handoff notices in the agent's inbox, taken and acked: event by handoff id."""
    answer = await n.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(max_messages=100), metadata=agent.md)
    found = {}
    for d in answer.deliveries:
        if "agentvault-handoff" in d.message.headers:
            found[d.message.headers["agentvault-handoff"]] = d.message.headers["agentvault-handoff-event"]
            await n.messaging.AckMessage(
                mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt), metadata=agent.md
            )
    return found


async def wait_notice(n: Net, agent: LocalAgent, handoff_id: str, event: str) -> None:
    seen: dict[str, str] = {}

    async def told() -> None:
        seen.update(await notices(n, agent))
        assert seen.get(handoff_id) == event, seen

    await eventually(told, 10)


async def owners(s: spb_grpc.SessionServiceStub, who: LocalAgent, session_id: str) -> list[tuple[str, int, bool]]:
    got = await s.ListSessionOwners(spb.ListSessionOwnersRequest(id=session_id), metadata=who.md)
    return [(o.agent_id, o.generation, o.HasField("until")) for o in got.owners]


async def test_an_accepted_handoff_moves_the_session_and_its_conversation(
    net: Net, sessions: spb_grpc.SessionServiceStub
) -> None:
    alice, bob, carol = await local_agent(net), await local_agent(net), await local_agent(net)
    session = await new_session(sessions, alice, metadata={"topic": "refund"})
    assert (session.owner_agent_id, session.generation, session.state_version) == (alice.id, 1, 1)
    # Waiting in alice's inbox, unclaimed: it moves with the session.
    queued = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(alice, "before", conversation_id=session.conversation_id)),
        metadata=carol.md,
    )
    handoff = await offer(sessions, alice, session, bob, state=state(step=2, notes="x" * 1000), note="your turn")
    assert handoff.status == "offered" and handoff.deadline.seconds and len(handoff.signature) == 64
    await wait_notice(net, bob, handoff.id, "offered")

    done = await accept(sessions, bob, handoff.id)
    assert done.status == "accepted"
    now = await sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=bob.md)
    assert (now.owner_agent_id, now.generation) == (bob.id, 2)
    assert json.loads(now.state) == {"format_version": "1", "step": 2, "notes": "x" * 1000}
    assert now.state_sha256 == handoff.state_sha256 and not now.open_handoff_id
    await wait_notice(net, alice, handoff.id, "accepted")
    assert await owners(sessions, bob, session.id) == [(alice.id, 1, True), (bob.id, 2, False)]

    # The old owner still reads the session, without its state, and can no longer change it.
    old = await sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert old.owner_agent_id == bob.id and old.state == ""
    await refused(
        sessions.UpdateSessionState(spb.UpdateSessionStateRequest(id=session.id, state=state()), metadata=alice.md),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_THE_SESSION_OWNER",
    )
    await refused(offer(sessions, alice, session, carol), grpc.StatusCode.PERMISSION_DENIED, "NOT_THE_SESSION_OWNER")

    # The conversation's next message to the old owner lands with the new one, and the queued one moved too.
    after = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(alice, "after", conversation_id=session.conversation_id)),
        metadata=carol.md,
    )
    assert after.message.recipient.agent_id == bob.id
    got = await net.messaging.ReceiveMessages(
        mpb.ReceiveMessagesRequest(max_messages=10, wait_seconds=5), metadata=bob.md
    )
    texts = {d.message.parts[0].text for d in got.deliveries if d.message.conversation_id == session.conversation_id}
    assert texts == {"before", "after"}
    assert queued.message.id in {d.message.id for d in got.deliveries}
    # A message of another conversation still goes to alice.
    other = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(alice, "elsewhere", conversation_id="another")), metadata=carol.md
    )
    assert other.message.recipient.agent_id == alice.id

    # The new owner works on the state, with optimistic concurrency.
    updated = await sessions.UpdateSessionState(
        spb.UpdateSessionStateRequest(id=session.id, state=state(step=3), state_version=now.state_version),
        metadata=bob.md,
    )
    assert updated.state_version == now.state_version + 1
    await refused(
        sessions.UpdateSessionState(
            spb.UpdateSessionStateRequest(id=session.id, state=state(step=4), state_version=now.state_version),
            metadata=bob.md,
        ),
        grpc.StatusCode.ABORTED,
        "SESSION_STATE_CHANGED",
    )


async def test_a_rejected_handoff_moves_nothing(net: Net, sessions: spb_grpc.SessionServiceStub) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    session = await new_session(sessions, alice)
    handoff = await offer(sessions, alice, session, bob)
    # The state is frozen while an offer is open.
    await refused(
        sessions.UpdateSessionState(spb.UpdateSessionStateRequest(id=session.id, state=state()), metadata=alice.md),
        grpc.StatusCode.FAILED_PRECONDITION,
        "HANDOFF_IN_PROGRESS",
    )
    rejected = await sessions.RejectHandoff(spb.RejectHandoffRequest(id=handoff.id, reason="busy"), metadata=bob.md)
    assert (rejected.status, rejected.status_reason) == ("rejected", "busy")
    await wait_notice(net, alice, handoff.id, "rejected")
    await refused(accept(sessions, bob, handoff.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_NOT_OPEN")
    now = await sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (now.owner_agent_id, now.generation, now.state) == (alice.id, 1, session.state)
    assert await owners(sessions, alice, session.id) == [(alice.id, 1, False)]
    # And a new offer may follow; its initiator may withdraw it.
    second = await offer(sessions, alice, session, bob)
    cancelled = await sessions.CancelHandoff(spb.CancelHandoffRequest(id=second.id), metadata=alice.md)
    assert cancelled.status == "cancelled"


async def test_an_unanswered_handoff_expires_and_nothing_moves(net: Net, sessions: spb_grpc.SessionServiceStub) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    session = await new_session(sessions, alice)
    handoff = await offer(sessions, alice, session, bob, deadline_seconds=1)
    # The sweeper expires it and tells the initiator, without anyone reading it.
    await wait_notice(net, alice, handoff.id, "expired")
    got = await sessions.GetHandoff(spb.GetHandoffRequest(id=handoff.id), metadata=bob.md)
    assert got.status == "expired"
    await refused(accept(sessions, bob, handoff.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_NOT_OPEN")
    now = await sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (now.owner_agent_id, now.generation) == (alice.id, 1)
    await refused(
        offer(sessions, alice, session, bob, deadline_seconds=100_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


@pytest.fixture
async def notice_fault(db: asyncpg.Connection) -> AsyncIterator[set[str]]:
    """A real trigger that makes storing a handoff notice to the agents in the yielded set fail, counting each try
    in a sequence (not rolled back with the failing transaction)."""
    await db.execute(
        """CREATE TABLE IF NOT EXISTS test_notice_faults (agent TEXT PRIMARY KEY);
           CREATE SEQUENCE IF NOT EXISTS test_notice_fault_hits;
           CREATE OR REPLACE FUNCTION test_notice_fault() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.sender_id = 'svc-messaging'
                AND EXISTS (SELECT 1 FROM test_notice_faults WHERE agent = NEW.recipient_agent) THEN
               PERFORM nextval('test_notice_fault_hits');
               RAISE EXCEPTION 'injected: no notice for %', NEW.recipient_agent;
             END IF;
             RETURN NEW;
           END $$;
           DROP TRIGGER IF EXISTS test_notice_fault ON messages;
           CREATE TRIGGER test_notice_fault BEFORE INSERT ON messages
             FOR EACH ROW EXECUTE FUNCTION test_notice_fault();"""
    )
    blocked: set[str] = set()
    try:
        yield blocked
    finally:
        await db.execute("DROP TRIGGER IF EXISTS test_notice_fault ON messages")
        await db.execute("DELETE FROM test_notice_faults WHERE agent = ANY($1::text[])", list(blocked))


async def _block(db: asyncpg.Connection, blocked: set[str], *agents: str) -> None:
    await db.execute("DELETE FROM test_notice_faults WHERE agent = ANY($1::text[])", list(blocked))
    blocked.clear()
    blocked.update(agents)
    await db.executemany("INSERT INTO test_notice_faults (agent) VALUES ($1)", [(a,) for a in agents])


async def _untold(db: asyncpg.Connection, session_id: str) -> list[tuple[str, str]]:
    """The session's handoffs in a told status (all but held) whose notices are missing: (status, agent)."""
    rows = await db.fetch(
        """SELECT h.status, who.agent FROM session_handoffs h
           CROSS JOIN LATERAL (VALUES (CASE WHEN h.status = 'offered' THEN h.target_agent ELSE h.from_agent END),
               (CASE WHEN h.status IN ('offered', 'cancelled', 'expired') THEN h.target_agent END)) AS who(agent)
           WHERE h.session_id = $1::uuid AND h.status <> 'held' AND who.agent IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = 'handoff:' || h.id::text
                             AND m.recipient_agent = who.agent)""",
        session_id,
    )
    return [(r["status"], r["agent"]) for r in rows]


async def test_a_handoff_change_and_its_notice_commit_together(
    net: Net, sessions: spb_grpc.SessionServiceStub, db: asyncpg.Connection, notice_fault: set[str]
) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    session = await new_session(sessions, alice)

    async def hits() -> int:
        return int(
            await db.fetchval("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM test_notice_fault_hits")
        )

    # The target's notice cannot be stored: the offer is not made (nor acknowledged) either.
    await _block(db, notice_fault, bob.id)
    before = await hits()
    with pytest.raises(grpc.aio.AioRpcError):
        await offer(sessions, alice, session, bob)
    assert await hits() > before
    assert await db.fetchval("SELECT count(*) FROM session_handoffs WHERE session_id = $1::uuid", session.id) == 0

    # Made again once it can be told: stored with its notice.
    await _block(db, notice_fault)
    handoff = await offer(sessions, alice, session, bob, deadline_seconds=1)
    await wait_notice(net, bob, handoff.id, "offered")
    assert await _untold(db, session.id) == []

    # The sweeper's expiry cannot tell the initiator: it does not happen until it can (the sweeper tries again).
    await _block(db, notice_fault, alice.id)
    before = await hits()

    async def swept() -> None:
        assert await hits() > before

    await eventually(swept, 15)
    assert await db.fetchval("SELECT status FROM session_handoffs WHERE id = $1::uuid", handoff.id) == "offered"
    assert await _untold(db, session.id) == []
    await _block(db, notice_fault)
    await wait_notice(net, alice, handoff.id, "expired")
    await wait_notice(net, bob, handoff.id, "expired")
    assert await _untold(db, session.id) == []

    # An acceptance whose notice to the old owner cannot be stored leaves the session where it was.
    handoff = await offer(sessions, alice, session, bob)
    await wait_notice(net, bob, handoff.id, "offered")
    await _block(db, notice_fault, alice.id)
    with pytest.raises(grpc.aio.AioRpcError):
        await accept(sessions, bob, handoff.id)
    now = await sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (now.owner_agent_id, now.generation) == (alice.id, 1)
    assert await _untold(db, session.id) == []
    await _block(db, notice_fault)
    assert (await accept(sessions, bob, handoff.id)).status == "accepted"
    await wait_notice(net, alice, handoff.id, "accepted")
    assert await _untold(db, session.id) == []


async def _consistent(db: asyncpg.Connection, session_id: str) -> tuple[str, int]:
    """The session's owner and generation, after checking the history agrees: one open owner row, the owner's, at
    the session's generation, and one row per generation."""
    row = await db.fetchrow("SELECT owner_agent, generation FROM sessions WHERE id = $1::uuid", session_id)
    history = await db.fetch(
        "SELECT agent_id, generation, until FROM session_owners WHERE session_id = $1::uuid ORDER BY generation",
        session_id,
    )
    assert [h["generation"] for h in history] == list(range(1, row["generation"] + 1))
    open_rows = [h for h in history if h["until"] is None]
    assert len(open_rows) == 1 and open_rows[0]["agent_id"] == row["owner_agent"]
    assert open_rows[0]["generation"] == row["generation"]
    accepted = await db.fetchval(
        "SELECT count(*) FROM session_handoffs WHERE session_id = $1::uuid AND status = 'accepted'", session_id
    )
    assert accepted == row["generation"] - 1
    return row["owner_agent"], row["generation"]


async def test_racing_handoffs_and_accepts_leave_exactly_one_owner(
    net: Net, sessions: spb_grpc.SessionServiceStub, db: asyncpg.Connection
) -> None:
    alice = await local_agent(net)
    targets = [await local_agent(net) for _ in range(6)]
    session = await new_session(sessions, alice)
    # Six offers at once: one stands, the others are refused.
    results = await asyncio.gather(*(offer(sessions, alice, session, t) for t in targets), return_exceptions=True)
    standing = [r for r in results if isinstance(r, spb.Handoff)]
    assert len(standing) == 1, results
    for r in results:
        if not isinstance(r, spb.Handoff):
            assert isinstance(r, grpc.aio.AioRpcError) and reason(r)[0] == "HANDOFF_IN_PROGRESS", r
    winner = next(t for t in targets if t.id == standing[0].target.agent_id)
    # The target accepts it six times at once (retries, or several of its instances): one acceptance.
    results = await asyncio.gather(
        *(accept(sessions, winner, standing[0].id) for _ in range(6)), return_exceptions=True
    )
    assert sum(isinstance(r, spb.Handoff) for r in results) == 1, results
    assert await _consistent(db, session.id) == (winner.id, 2)

    # An expiry racing acceptances, fired around the deadline (the sweeper's, and GetHandoff's lazy expiry): whichever
    # wins, the session and its history agree.
    seen = set()
    for offset in (-0.05, -0.01, 0.0, 0.01, 0.05):
        bob = await local_agent(net)
        raced = await new_session(sessions, alice)
        handoff = await offer(sessions, alice, raced, bob, deadline_seconds=1)
        got = await sessions.GetHandoff(spb.GetHandoffRequest(id=handoff.id), metadata=bob.md)
        request = spb.AcceptHandoffRequest(id=handoff.id, state_sha256=got.state_sha256, signature=got.signature)
        await asyncio.sleep(max(0.0, handoff.deadline.ToDatetime(UTC).timestamp() + offset - time.time()))
        await asyncio.gather(
            *(sessions.AcceptHandoff(request, metadata=bob.md) for _ in range(3)),
            *(sessions.GetHandoff(spb.GetHandoffRequest(id=handoff.id), metadata=bob.md) for _ in range(2)),
            return_exceptions=True,
        )

        async def settled(handoff: spb.Handoff = handoff, bob: LocalAgent = bob, raced: spb.Session = raced) -> None:
            status = (await sessions.GetHandoff(spb.GetHandoffRequest(id=handoff.id), metadata=bob.md)).status
            assert status in ("accepted", "expired"), status
            seen.add(status)
            owner, generation = await _consistent(db, raced.id)
            assert (owner, generation) == ((bob.id, 2) if status == "accepted" else (alice.id, 1)), status

        await eventually(settled, 10)
    assert seen <= {"accepted", "expired"}


async def test_a_tampered_state_is_refused(
    net: Net, sessions: spb_grpc.SessionServiceStub, db: asyncpg.Connection
) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    session = await new_session(sessions, alice)
    handoff = await offer(sessions, alice, session, bob, state=state(balance=10))
    got = await sessions.GetHandoff(spb.GetHandoffRequest(id=handoff.id), metadata=bob.md)
    # A digest or signature other than the offer's is refused, and the offer stays.
    forged = spb.AcceptHandoffRequest(id=handoff.id, state_sha256=got.state_sha256, signature="00" * 32)
    await refused(
        sessions.AcceptHandoff(forged, metadata=bob.md), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_INTEGRITY"
    )
    # The stored state changed behind the mesh's back: refused, and nothing moves.
    await db.execute(
        "UPDATE session_handoffs SET state = $2 WHERE id = $1::uuid", handoff.id, state(balance=1_000_000).encode()
    )
    await refused(accept(sessions, bob, handoff.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_INTEGRITY")
    after = await sessions.GetHandoff(spb.GetHandoffRequest(id=handoff.id), metadata=alice.md)
    assert after.status == "refused"
    now = await sessions.GetSession(spb.GetSessionRequest(id=session.id), metadata=alice.md)
    assert (now.owner_agent_id, now.generation, json.loads(now.state)) == (alice.id, 1, json.loads(session.state))
    # A digest that was made to match the new state still fails the signature.
    handoff = await offer(sessions, alice, session, bob, state=state(balance=10))
    forged_state = state(balance=2_000_000).encode()
    await db.execute(
        "UPDATE session_handoffs SET state = $2, state_sha256 = $3 WHERE id = $1::uuid",
        handoff.id,
        forged_state,
        hashlib.sha256(forged_state).digest(),
    )
    await refused(accept(sessions, bob, handoff.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_INTEGRITY")
    assert (await _consistent(db, session.id)) == (alice.id, 1)


async def test_policy_deny_refuses_and_ask_holds_until_approved(
    net: Net, sessions: spb_grpc.SessionServiceStub
) -> None:
    alice = await local_agent(net)
    closed, guarded = await local_agent(net, tags=["closed"]), await local_agent(net, tags=["guarded"])
    session = await new_session(sessions, alice)
    meta = await refused(offer(sessions, alice, session, closed), grpc.StatusCode.PERMISSION_DENIED, "HANDOFF_DENIED")
    assert meta["policies"]
    held = await offer(sessions, alice, session, guarded)
    assert held.status == "held" and held.approval_id and not held.HasField("deadline")
    await refused(accept(sessions, guarded, held.id), grpc.StatusCode.FAILED_PRECONDITION, "HANDOFF_NOT_OPEN")
    approval = await net.policies.GetApproval(ppb.GetApprovalRequest(id=held.approval_id), metadata=net.admin)
    assert approval.action == "session.handoff" and approval.status == "pending"
    await net.policies.ApproveApproval(ppb.ApproveApprovalRequest(id=approval.id, note="ok"), metadata=net.admin)
    await wait_notice(net, guarded, held.id, "offered")
    done = await accept(sessions, guarded, held.id)
    assert done.status == "accepted"
    # A denied approval refuses the held offer.
    other = await local_agent(net, tags=["guarded"])
    session2 = await new_session(sessions, alice)
    held = await offer(sessions, alice, session2, other)
    await net.policies.DenyApproval(ppb.DenyApprovalRequest(id=held.approval_id, note="no"), metadata=net.admin)
    await wait_notice(net, alice, held.id, "refused")
    now = await sessions.GetSession(spb.GetSessionRequest(id=session2.id), metadata=alice.md)
    assert (now.owner_agent_id, now.generation) == (alice.id, 1)


async def test_only_the_owner_offers_and_only_the_target_accepts(
    net: Net, sessions: spb_grpc.SessionServiceStub
) -> None:
    alice, bob, mallory = await local_agent(net), await local_agent(net), await local_agent(net)
    session = await new_session(sessions, alice)
    # Someone with no part in the session does not even see it.
    await refused(offer(sessions, mallory, session, mallory), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    handoff = await offer(sessions, alice, session, bob)
    await refused(accept(sessions, mallory, handoff.id), grpc.StatusCode.NOT_FOUND, "HANDOFF_NOT_FOUND")
    await refused(accept(sessions, alice, handoff.id), grpc.StatusCode.PERMISSION_DENIED, "NOT_THE_HANDOFF_TARGET")
    await refused(
        sessions.CancelHandoff(spb.CancelHandoffRequest(id=handoff.id), metadata=bob.md),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_THE_HANDOFF_INITIATOR",
    )
    # The same conversation cannot have two sessions; a peer mesh must be one this mesh knows
    # (handoffs across meshes: test_handoff_across_meshes.py).
    await refused(
        new_session(sessions, mallory, conversation_id=session.conversation_id),
        grpc.StatusCode.ALREADY_EXISTS,
        "SESSION_EXISTS",
    )
    other = await new_session(sessions, alice)
    request = spb.InitiateHandoffRequest(session_id=other.id, target=spb.HandoffTarget(agent_id=bob.id, mesh="peer"))
    await refused(sessions.InitiateHandoff(request, metadata=alice.md), grpc.StatusCode.NOT_FOUND, "PEER_NOT_FOUND")
    # The owner's history of handoffs lists it.
    listed = await sessions.ListHandoffs(spb.ListHandoffsRequest(session_id=session.id), metadata=bob.md)
    assert [h.id for h in listed.handoffs] == [handoff.id] and not listed.handoffs[0].state


async def test_bad_and_oversize_states_are_refused(net: Net, sessions: spb_grpc.SessionServiceStub) -> None:
    alice = await local_agent(net)
    big = state(blob="x" * MAX_STATE)
    meta = await refused(
        new_session(sessions, alice, state=big), grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_STATE_TOO_LARGE"
    )
    assert meta["limit"] == str(MAX_STATE)
    for bad in ("[1, 2]", "{not json", json.dumps({"format_version": "9"})):
        await refused(new_session(sessions, alice, state=bad), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    session = await new_session(sessions, alice)
    bob = await local_agent(net)
    await refused(
        offer(sessions, alice, session, bob, state=big), grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_STATE_TOO_LARGE"
    )


async def test_a_handoff_over_rest(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    async with aiohttp.ClientSession(net.mesh.url(""), timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def call(method: str, path: str, who: LocalAgent, body: Any = None) -> tuple[int, Any]:
            async with http.request(method, path, headers=auth(who.token), json=body) as resp:
                return resp.status, await resp.json()

        status, session = await call(
            "POST", "/api/v1/sessions", alice, {"conversation_id": f"rest-{secrets.token_hex(4)}", "state": state()}
        )
        assert status == 200, session
        status, handoff = await call(
            "POST", f"/api/v1/sessions/{session['id']}:handoff", alice, {"target": {"agent_id": bob.id}}
        )
        assert status == 200 and handoff["status"] == "offered", handoff
        status, got = await call("GET", f"/api/v1/handoffs/{handoff['id']}", bob)
        assert status == 200 and json.loads(got["state"]) == {"format_version": "1"}
        body = {"state_sha256": got["state_sha256"], "signature": got["signature"]}
        status, done = await call("POST", f"/api/v1/handoffs/{handoff['id']}:accept", bob, body)
        assert status == 200 and done["status"] == "accepted", done
        status, history = await call("GET", f"/api/v1/sessions/{session['id']}/owners", bob)
        assert status == 200 and [o["agent_id"] for o in history["owners"]] == [alice.id, bob.id]
        # Oversize: 413 from the service's bound, a JSON error.
        status, error = await call(
            "POST", "/api/v1/sessions", alice, {"conversation_id": "rest-big", "state": state(b="x" * MAX_STATE)}
        )
        assert status == 413, error
        assert error["error"]["details"][0]["reason"] == "SESSION_STATE_TOO_LARGE"
