"""Session handoffs across meshes: offers to peer meshes' agents, offers from peers, and their two-phase end."""

from __future__ import annotations

# SQL composed from constant column lists only; every value is a bound parameter (as in the *_store.py modules).
# ruff: noqa: S608
import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
from google.protobuf import json_format, timestamp_pb2

from agentvault.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
    invalid,
)
from agentvault.common.policy.asking import Asker, ask_once, held_for, refuse_unless_decided
from agentvault.common.policy.enforcer import Enforcer
from agentvault.common.policy.engine import Outcome
from agentvault.common.policy.request import Trust, agent_target, caller
from agentvault.common.principal import Kind, Principal
from agentvault.messaging.v1 import federated_messaging_pb2 as fpb
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import session_service_pb2 as spb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault_messaging import model
from agentvault_messaging.events import Hub
from agentvault_messaging.federation import FEDERATION, PeerBook, PeerCallError, PeerClient, peer_inbox
from agentvault_messaging.session_store import HandoffRow, SessionStore
from agentvault_messaging.sessions import (
    _ID,
    DEFAULT_DEADLINE,
    MAX_NOTE,
    Notices,
    _hex,
    _label,
    check_state,
    digest_of,
    handoff_proto,
    sign,
)
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import INBOX, ROW_COLUMNS_NO_BODY, IdempotencyConflict, NewMessage, Row, Store

log = logging.getLogger(__name__)

HANDOFFS_PATH = "/api/v1/federation/handoffs"
OFFER_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/OfferFederatedHandoff"
STATUS_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/GetFederatedHandoffStatus"
CONCLUDE_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/ConcludeFederatedHandoff"
# How often at most an offer's peer is asked again (from MESSAGING_POLL_SECONDS, doubling up to this).
MAX_CHECK_SECONDS = 5.0
BATCH = 100
# A held offer from a peer whose deadline passed is ended here this long after it, if its peer said nothing (the
# peer's own conclusion, "aborted", normally comes first).
HELD_GRACE_SECONDS = 60
# The peer's statuses after which nothing changes there any more.
PEER_FINAL = {"rejected": "rejected", "refused": "refused", "expired": "expired", "aborted": "refused"}
_INCOMING = (
    "id, peer, session_id, conversation_id, from_agent, target_agent, target_instance, target_principal, status, "
    "status_reason, generation, state, state_sha256, signature, request_hash, note, deadline, accepted_instance, "
    "created_at, updated_at, approval_id"
)
_INCOMING_NO_STATE = _INCOMING.replace(
    "state, state_sha256", "''::bytea AS state, length(state) AS state_size, state_sha256"
)


@dataclass(frozen=True)
class Incoming:
    id: uuid.UUID
    peer: str
    session_id: uuid.UUID
    conversation_id: str
    from_agent: str
    target_agent: str
    target_instance: str
    target_principal: str
    status: str
    status_reason: str
    generation: int
    state: bytes
    state_sha256: bytes
    signature: bytes
    request_hash: bytes
    note: str
    deadline: datetime
    accepted_instance: str
    created_at: datetime
    updated_at: datetime
    state_size: int = -1
    # Held by this mesh's "ask": the approval that releases it (0009_incoming_handoffs_held.sql).
    approval_id: uuid.UUID | None = None

    @classmethod
    def of(cls, record: asyncpg.Record) -> Incoming:
        return cls(**dict(record))

    def as_handoff(self) -> HandoffRow:
        """As a handoff of this mesh (for its notices and its answers): from an agent of the peer."""
        return HandoffRow(
            id=self.id,
            session_id=self.session_id,
            conversation_id=self.conversation_id,
            from_agent=self.from_agent,
            from_instance="",
            from_principal="",
            target_agent=self.target_agent,
            target_instance=self.target_instance,
            target_mesh="",
            target_principal=self.target_principal,
            status=self.status,
            status_reason=self.status_reason,
            base_generation=self.generation,
            state=self.state,
            state_sha256=self.state_sha256,
            signature=self.signature,
            approval_id=self.approval_id,
            note=self.note,
            deadline_seconds=0,
            deadline=self.deadline,
            accepted_instance=self.accepted_instance,
            created_at=self.created_at,
            updated_at=self.updated_at,
            state_size=self.state_size if self.state_size >= 0 else len(self.state),
        )


def _status(row: Incoming) -> fpb.FederatedHandoffStatus:
    return fpb.FederatedHandoffStatus(
        id=str(row.id), status=row.status, status_reason=row.status_reason, accepted_instance=row.accepted_instance
    )


def _answer_of(document: dict[str, Any]) -> fpb.FederatedHandoffStatus:
    answer = fpb.FederatedHandoffStatus()
    try:
        json_format.ParseDict(document, answer, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError):
        raise PeerCallError(502, "", "the peer's answer is not a handoff status", None) from None
    return answer


def _initiator_only(notices: Notices) -> Callable[[HandoffRow], Sequence[NewMessage]]:
    """The notices of an offer to a peer's agent: only the initiator's (the target is told in its own mesh)."""
    return lambda h: [n for n in notices.of(h) if n.recipient_agent == h.from_agent]


async def _tell(store: Store, conn: asyncpg.Connection, news: Sequence[NewMessage]) -> list[Row]:
    told: list[Row] = []
    for new in news:
        try:
            row, duplicate = await store.insert(new, conn)
        except IdempotencyConflict:  # its fixed id is stored already: told once
            continue
        if not duplicate:
            told.append(row)
    return told


class HandoffsAcrossMeshes:
    """Both sides of a handoff across meshes. The origin (A) owns the session until it commits an acceptance (its
    owner UPDATE fenced by the generation, before its deadline); the target's mesh (B) holds an acceptance as
    "prepared" until A concludes it, and makes its copy of the session live only on "committed". A asks B (the
    follower below polls, so one-way peering suffices), commits, then tells B; an offer that expires or is withdrawn
    at A is concluded "aborted" at B, whatever B's target answered."""

    def __init__(
        self,
        settings: MessagingSettings,
        sessions: SessionStore,
        notices: Notices,
        enforcer: Enforcer,
        store: Store,
        hub: Hub,
        book: PeerBook,
        client: PeerClient,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.pool = sessions.pool
        self.notices = notices
        self.enforcer = enforcer
        self.store = store
        self.hub = hub
        self.book = book
        self.client = client
        # The peer-facing service's lookup of a federated agent of this mesh (FederatedMessaging._recipient).
        self.recipient: Callable[[mpb.Party], Awaitable[reg_pb.Agent]] | None = None
        # The control plane that makes approvals (set by __main__): "ask" holds offers both ways; None refuses them.
        self.control: Asker | None = None

    # A: offering a session to an agent of a peer mesh ---------------------------------------------------------

    async def initiate(self, principal: Principal, request: spb.InitiateHandoffRequest) -> spb.Handoff:
        target = request.target
        key = model.require_uuid("session_id", request.session_id)
        target_id = model.require_uuid("target.agent_id", target.agent_id)
        target_instance = _label(target.instance, "target.instance")
        instance = _label(request.instance, "instance")
        if len(request.note) > MAX_NOTE:
            raise invalid("note", f"at most {MAX_NOTE} characters")
        limit = self.settings.handoff_max_seconds
        seconds = request.deadline_seconds or min(DEFAULT_DEADLINE, limit)
        if not 1 <= seconds <= limit:
            raise invalid("deadline_seconds", f"must be from 1 to {limit} (MESSAGING_HANDOFF_MAX_SECONDS)")
        session = await self.sessions.get(key, with_state=not request.state)
        if session is None or session.owner_agent != principal.agent_id:
            if session is not None and await self.sessions.was_owner(key, principal.agent_id):
                raise PermissionDenied("only the session's owner hands it off", "NOT_THE_SESSION_OWNER")
            raise NotFound(f"session {request.session_id} not found", "SESSION_NOT_FOUND", id=request.session_id)
        state = check_state(request.state, self.settings.session_max_bytes, "state") if request.state else session.state
        if session.open_handoff is not None:
            raise _in_progress(session.open_handoff)
        peer = await self.book.require(target.mesh)
        if not peer.api_key:
            raise Unavailable(f"peer mesh {peer.name} has no credential for this mesh", "PEER_UNAVAILABLE")
        who = caller(principal, Trust.UNTRUSTED, self.settings.mesh)
        policy_target = agent_target(str(target_id), "", (), peer.name)
        verdict = await self.enforcer.decide(
            who, "session.handoff", policy_target, agent_id=str(target_id), payload_size=len(state)
        )
        try:
            refuse_unless_decided(verdict, "this handoff", "HANDOFF_DENIED")
            status, approval_id, reason = "offered", None, ""
            if verdict.outcome is Outcome.ASK:
                if self.control is None:
                    raise PermissionDenied(
                        "this mesh's policy asks for an approval, which cannot be asked for here: "
                        + "; ".join(verdict.decision.reasons),
                        "HANDOFF_DENIED",
                    )
                # Held as a local offer is (sessions.py): sent to the peer when approved, its deadline starting then.
                # Approvals name an agent of this mesh: the session's owner (its owner answers), the grant the target.
                approval = await ask_once(
                    self.control,
                    verdict,
                    requested_by=principal.id,
                    action="session.handoff",
                    target=policy_target.uid,
                    agent_id=principal.agent_id,
                    purpose=f"hand session {session.id} (conversation {session.conversation_id}) to agent {target_id} "
                    f"of peer mesh {peer.name}",
                )
                status, approval_id, reason = held_for(approval)
            handoff_id = uuid.uuid4()
            digest = digest_of(state)
            signature = sign(self.settings.session_key, handoff_id, key, session.generation, digest)
            row = await self._offer(
                handoff_id,
                session.id,
                session.generation,
                principal,
                instance or session.owner_instance,
                str(target_id),
                target_instance,
                peer.name,
                state,
                digest,
                signature,
                request.note,
                seconds,
                status,
                approval_id,
                reason,
            )
        finally:
            await verdict.done()
        log.info("handoff offered to a peer mesh", extra={"handoff_id": str(row.id), "peer": peer.name})
        # Told now, so that the initiator learns of a refusal at once; a peer that cannot be reached is asked again
        # by the follower (the offer is idempotent), until the deadline.
        await self._check(row.id)
        done = await self.sessions.handoff(row.id, with_state=False)
        return handoff_proto(done or row, with_state=False)

    async def _offer(
        self,
        handoff_id: uuid.UUID,
        session_id: uuid.UUID,
        generation: int,
        principal: Principal,
        instance: str,
        target_agent: str,
        target_instance: str,
        peer: str,
        state: bytes,
        digest: bytes,
        signature: bytes,
        note: str,
        seconds: int,
        status: str = "offered",
        approval_id: uuid.UUID | None = None,
        reason: str = "",
    ) -> HandoffRow:
        async with self.pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchrow(
                "SELECT owner_agent, generation FROM sessions WHERE id = $1 FOR UPDATE", session_id
            )
            if owner is None or owner["owner_agent"] != principal.agent_id or owner["generation"] != generation:
                raise FailedPrecondition("the session changed meanwhile; read it again", "SESSION_CHANGED")
            try:
                await conn.execute(
                    """INSERT INTO session_handoffs (id, session_id, from_agent, from_instance, from_principal,
                           target_agent, target_instance, target_mesh, status, status_reason, approval_id,
                           base_generation, state, state_sha256, signature, note, deadline_seconds, deadline,
                           peer_told, peer_check_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $16::text, $17, $18, $9, $10, $11, $12, $13, $14::int,
                           -- A held offer's clock starts at its approval (SessionStore.release), as a local one's.
                           CASE WHEN $16::text = 'offered' THEN now() + make_interval(secs => $14::int) END,
                           false, now() + make_interval(secs => $15))""",
                    handoff_id, session_id, principal.agent_id, instance, principal.id, target_agent,
                    target_instance, peer, generation, state, digest, signature, note, seconds,
                    # The initiator offers it first itself; the follower takes over after.
                    self.settings.delivery_timeout, status, reason[:1024], approval_id,
                )  # fmt: skip
            except asyncpg.UniqueViolationError:
                raise _in_progress(None) from None
        row = await self.sessions.handoff(handoff_id, with_state=False)
        assert row is not None
        return row

    # A: following its offers until B knows their end -------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("handoffs across meshes: follow-up failed: %s", exc)
            await asyncio.sleep(self.settings.poll_seconds)

    async def follow(self) -> None:
        due = await self.pool.fetch(
            """WITH picked AS (
                   SELECT id FROM session_handoffs WHERE NOT peer_told AND peer_check_at <= now()
                   ORDER BY peer_check_at LIMIT $1 FOR UPDATE SKIP LOCKED)
               UPDATE session_handoffs h SET peer_check_at = now() + make_interval(secs => least($3::float8,
                   greatest($2::float8, extract(epoch FROM now() - h.created_at)::float8 / 4)))
               FROM picked WHERE h.id = picked.id RETURNING h.id""",
            BATCH,
            self.settings.poll_seconds,
            MAX_CHECK_SECONDS,
        )
        await asyncio.gather(*(self._check(r["id"]) for r in due))
        # Offers made to this mesh and never answered: expired (a late acceptance is refused).
        expired = await self.pool.fetch(
            f"""UPDATE incoming_handoffs SET status = 'expired', status_reason = 'no answer before the deadline',
                    updated_at = now() WHERE status = 'offered' AND deadline <= now() RETURNING {_INCOMING}"""
        )
        await self._tell_incoming([Incoming.of(r) for r in expired], "expired")
        # Held ones whose peer never concluded them: ended a grace period after the deadline (never told of: no one
        # here is told of their end either).
        await self.pool.execute(
            """UPDATE incoming_handoffs SET status = 'expired', status_reason = 'no answer before the deadline',
                   updated_at = now() WHERE status = 'held' AND deadline <= now() - make_interval(secs => $1)""",
            HELD_GRACE_SECONDS,
        )

    # Approvals: held offers both ways (sessions.HandoffApprovals calls these) ------------------------------------

    async def held(self, limit: int) -> list[uuid.UUID]:
        """The approvals that offers from peers held here wait for."""
        records = await self.pool.fetch(
            "SELECT DISTINCT approval_id FROM incoming_handoffs WHERE status = 'held' AND approval_id IS NOT NULL "
            "LIMIT $1",
            limit,
        )
        return [r["approval_id"] for r in records]

    async def released(
        self, approval_id: uuid.UUID, approved: bool, reason: str, released: Sequence[HandoffRow] = ()
    ) -> None:
        """An answered approval: offers to peers' agents it released (`released`, already offered by the session
        store, their deadline started) are sent to the peer now; offers from peers it held here are offered to their
        target (told in its inbox) when approved and still in time, expired when late, refused when denied."""
        async with self.pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                f"""UPDATE incoming_handoffs SET updated_at = now(),
                        status = CASE WHEN NOT $2 THEN 'refused' WHEN deadline <= now() THEN 'expired'
                            ELSE 'offered' END,
                        status_reason = CASE WHEN NOT $2 THEN $3 WHEN deadline <= now()
                            THEN 'no answer before the deadline' ELSE '' END
                    WHERE approval_id = $1 AND status = 'held' RETURNING {_INCOMING_NO_STATE}""",
                approval_id,
                approved,
                f"this mesh's approval: {reason}"[:1024],
            )
            rows = [Incoming.of(r) for r in records]
            told: list[Row] = []
            for row in rows:
                if row.status == "offered":
                    told += await _tell(self.store, conn, self._notices(row, "offered"))
        for row in rows:
            log.info("held handoff from a peer released", extra={"handoff_id": str(row.id), "status": row.status})
        await self.notices.publish(told)
        for handoff in released:
            if handoff.target_mesh and handoff.status == "offered":
                try:
                    await self._check(handoff.id)
                except Exception as exc:  # the follower offers it again
                    log.warning("handoff %s: offering it to its peer failed: %s", handoff.id, exc)

    async def _check(self, handoff_id: uuid.UUID) -> None:
        """One step of an offer to a peer: ask (or offer again), commit, conclude. Errors reaching the peer leave it
        for the next round."""
        row = await self.sessions.handoff(handoff_id, with_state=False)
        if row is None or not row.target_mesh or row.status == "held":
            return  # a held offer goes to the peer once approved (released)
        peer = await self.book.get(row.target_mesh)
        if peer is None or not peer.api_key:
            return
        path = f"{HANDOFFS_PATH}/{row.id}"
        timeout = self.settings.delivery_timeout
        try:
            if row.status == "offered":
                try:
                    answer = _answer_of(await self.client.call(peer, "GET", path, "", timeout))
                except PeerCallError as exc:
                    if exc.status != 404:
                        raise
                    answer = await self._send_offer(peer, row.id, timeout)
                if answer.status == "prepared":
                    if await self._commit(row, answer.accepted_instance):
                        await self._conclude(peer, row.id, "committed", "", timeout)
                elif answer.status in PEER_FINAL:
                    reason = f"{peer.name}: {answer.status_reason or answer.status}"
                    _, told = await self.sessions.settle(
                        row.id, ("offered",), PEER_FINAL[answer.status], reason[:1024], _initiator_only(self.notices)
                    )
                    await self._done(row.id)
                    await self.notices.publish(told)
            elif row.status == "accepted":
                await self._conclude(peer, row.id, "committed", "", timeout)
            elif row.status in ("expired", "cancelled", "refused"):
                await self._conclude(peer, row.id, "aborted", row.status_reason or row.status, timeout)
            else:
                await self._done(row.id)
        except PeerCallError as exc:
            log.info("handoff %s: peer %s answered %s %s", row.id, peer.name, exc.status, exc.reason)
            if exc.status in (400, 404, 409, 412) and row.status != "offered":
                await self._done(row.id)  # the peer holds no open offer to conclude
            elif exc.status in (400, 403, 409, 412, 413) and row.status == "offered":
                reason = f"{peer.name}: {exc.reason or exc.status} {exc.text}".strip()
                # The peer is still told "aborted" (next round), in case it holds the offer after all.
                _, told = await self.sessions.settle(
                    row.id, ("offered",), "refused", reason[:1024], _initiator_only(self.notices)
                )
                await self.notices.publish(told)
        except (aiohttp.ClientError, OSError, TimeoutError, Unavailable) as exc:
            log.info("handoff %s: peer %s not reached now: %s", row.id, peer.name, type(exc).__name__)

    async def _send_offer(self, peer: Any, handoff_id: uuid.UUID, timeout: float) -> fpb.FederatedHandoffStatus:
        full = await self.sessions.handoff(handoff_id, with_state=True)
        assert full is not None
        assert full.deadline is not None
        deadline = timestamp_pb2.Timestamp()
        deadline.FromDatetime(full.deadline)
        offer = fpb.OfferFederatedHandoffRequest(
            id=str(full.id),
            session_id=str(full.session_id),
            conversation_id=full.conversation_id,
            from_agent_id=full.from_agent,
            target_agent_id=full.target_agent,
            target_instance=full.target_instance,
            state=full.state.decode(),
            state_sha256=full.state_sha256.hex(),
            signature=full.signature.hex(),
            generation=full.base_generation,
            deadline=deadline,
            note=full.note,
        )
        body = json_format.MessageToJson(offer, preserving_proto_field_name=True, indent=None)
        return _answer_of(await self.client.call(peer, "POST", HANDOFFS_PATH, body, timeout))

    async def _conclude(self, peer: Any, handoff_id: uuid.UUID, outcome: str, reason: str, timeout: float) -> None:
        body = json.dumps({"outcome": outcome, "reason": reason[:1024]})
        await self.client.call(peer, "POST", f"{HANDOFFS_PATH}/{handoff_id}:conclude", body, timeout)
        await self._done(handoff_id)

    async def _done(self, handoff_id: uuid.UUID) -> None:
        await self.pool.execute("UPDATE session_handoffs SET peer_told = true WHERE id = $1", handoff_id)

    async def _commit(self, handoff: HandoffRow, instance: str) -> bool:
        """The owner change at A, all of it or nothing: the session (locked first), then the handoff, still offered,
        before its deadline, at the session's generation, its state intact. The owner becomes the peer's agent."""
        async with self.pool.acquire() as conn, conn.transaction():
            base = await conn.fetchrow(
                "SELECT generation, conversation_id FROM sessions WHERE id = $1 FOR UPDATE", handoff.session_id
            )
            ok = await conn.fetchval(
                """SELECT status = 'offered' AND deadline > clock_timestamp() AND base_generation = $2
                       AND sha256(state) = state_sha256
                   FROM session_handoffs WHERE id = $1 FOR UPDATE""",
                handoff.id,
                base["generation"] if base else -1,
            )
            if base is None or not ok:
                return False  # expired (the sweeper says so; B is then told "aborted") or changed
            generation = await conn.fetchval(
                """UPDATE sessions SET owner_agent = $3, owner_instance = $4, owner_principal = '', owner_mesh = $5,
                       generation = generation + 1, updated_at = now()
                   WHERE id = $1 AND generation = $2 RETURNING generation""",
                handoff.session_id,
                handoff.base_generation,
                handoff.target_agent,
                _safe_label(instance),
                handoff.target_mesh,
            )
            await conn.execute(
                "UPDATE session_owners SET until = now() WHERE session_id = $1 AND until IS NULL", handoff.session_id
            )
            await conn.execute(
                """INSERT INTO session_owners (session_id, generation, agent_id, instance, handoff_id)
                   VALUES ($1, $2, $3, $4, $5)""",
                handoff.session_id,
                generation,
                handoff.target_agent,
                _safe_label(instance),
                handoff.id,
            )
            done = await conn.fetchrow(
                """UPDATE session_handoffs SET status = 'accepted', accepted_instance = $2, status_reason = $3,
                       updated_at = now() WHERE id = $1 RETURNING id""",
                handoff.id,
                _safe_label(instance),
                f"accepted in peer mesh {handoff.target_mesh}",
            )
            assert done is not None
            moved = await self._send_unclaimed(conn, handoff, base["conversation_id"])
            # As this transaction wrote it (read elsewhere, it would still show offered).
            row = dataclasses.replace(
                handoff,
                status="accepted",
                accepted_instance=_safe_label(instance),
                status_reason=f"accepted in peer mesh {handoff.target_mesh}",
            )
            told = await _tell(self.store, conn, _initiator_only(self.notices)(row))
        log.info(
            "handoff across meshes committed",
            extra={
                "handoff_id": str(handoff.id),
                "session_id": str(handoff.session_id),
                "peer": handoff.target_mesh,
                "moved": len(moved),
            },
        )
        # Wakes the delivery workers for the messages now on their way to the peer (polling makes up for a loss).
        if moved:
            await self.hub.publish(moved)
        await self.notices.publish(told)
        return True

    async def _send_unclaimed(self, conn: asyncpg.Connection, handoff: HandoffRow, conversation_id: str) -> list[Row]:
        """The old owner's still unclaimed inbox messages of the conversation, re-addressed to the new owner in the
        peer mesh, in the commit's transaction, as a local acceptance moves them to the new owner's inbox: each
        becomes a message to that agent of the peer (as a send with `recipient.mesh` is stored: transport
        federation, the peer's inbox), so the federation transport hands it over with its id, conversation,
        correlation, sender and content. A message that answered one of this mesh's messages goes as a message of
        the conversation (its original is not in the peer; the id it answered is kept in its annotations)."""
        records = await conn.fetch(
            """SELECT id, body, in_reply_to FROM messages
               WHERE inbox = $1 AND conversation_id = $2 AND status = 'accepted' AND transport = $3
               ORDER BY seq FOR UPDATE""",
            f"agent:{handoff.from_agent}",
            conversation_id,
            INBOX,
        )
        moved: list[Row] = []
        for record in records:
            message = mpb.Message.FromString(record["body"])
            message.recipient.CopyFrom(mpb.Party(agent_id=handoff.target_agent, mesh=handoff.target_mesh))
            message.ClearField("in_reply_to")
            body = message.SerializeToString()
            answered = {"handoff.in_reply_to": str(record["in_reply_to"])} if record["in_reply_to"] else {}
            updated = await conn.fetchrow(
                f"""UPDATE messages SET inbox = $2, recipient_agent = $3, recipient_owner = '',
                       recipient_mesh = $4::text, transport = $5, endpoint = $4::text, body = $6, in_reply_to = NULL,
                       annotations = annotations || $7::jsonb, visible_at = now(), receipt = NULL,
                       status_reason = $8, updated_at = now()
                   WHERE id = $1 RETURNING {ROW_COLUMNS_NO_BODY}""",
                record["id"],
                peer_inbox(handoff.target_mesh),
                handoff.target_agent,
                handoff.target_mesh,
                FEDERATION,
                body,
                json.dumps({**answered, "handoff.id": str(handoff.id)}),
                f"its conversation's session moved to peer mesh {handoff.target_mesh} (handoff {handoff.id})"[:1024],
            )
            moved.append(Row.of(updated))
        return moved

    async def route_away(self, conversation_id: str, agent_id: str) -> tuple[str, str] | None:
        """The peer agent and mesh a message of `conversation_id` to `agent_id` goes to, when `agent_id` owned the
        conversation's session before it was handed to an agent of a peer mesh; else None."""
        if not conversation_id or not agent_id:
            return None
        record = await self.pool.fetchrow(
            """SELECT s.owner_agent, s.owner_mesh FROM sessions s
               WHERE s.conversation_id = $1 AND s.owner_mesh <> '' AND s.owner_agent <> $2
                 AND EXISTS (SELECT 1 FROM session_owners o WHERE o.session_id = s.id AND o.agent_id = $2)""",
            conversation_id,
            agent_id,
        )
        return (record["owner_agent"], record["owner_mesh"]) if record else None

    # B: offers from peers ------------------------------------------------------------------------------------

    async def offered(
        self, principal: Principal, request: fpb.OfferFederatedHandoffRequest
    ) -> fpb.FederatedHandoffStatus:
        handoff_id = model.require_uuid("id", request.id)
        session_id = model.require_uuid("session_id", request.session_id)
        if not _ID.fullmatch(request.conversation_id):
            raise invalid("conversation_id", "must be 1 to 128 printable ASCII characters without spaces")
        model.require_uuid("from_agent_id", request.from_agent_id)
        target_instance = _label(request.target_instance, "target_instance")
        if len(request.note) > MAX_NOTE:
            raise invalid("note", f"at most {MAX_NOTE} characters")
        if request.generation < 1:
            raise invalid("generation", "must be at least 1")
        if not request.HasField("deadline"):
            raise invalid("deadline", "is required")
        state = check_state(request.state, self.settings.session_max_bytes, "state")
        digest = _hex("state_sha256", request.state_sha256)
        signature = _hex("signature", request.signature)
        request_hash = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
        peer = principal.name
        existing = await self._incoming(handoff_id)
        if existing is not None:
            if existing.peer != peer or not hmac.compare_digest(existing.request_hash, request_hash):
                raise AlreadyExists("this handoff id is taken by another offer", "HANDOFF_ID_TAKEN")
            return _status(existing)
        if not hmac.compare_digest(digest_of(state), digest):
            log.error(
                "a peer's handoff offer failed its integrity check", extra={"peer": peer, "handoff_id": request.id}
            )
            raise FailedPrecondition(
                "the offer's state does not match its state_sha256; it was refused", "HANDOFF_INTEGRITY"
            )
        deadline = request.deadline.ToDatetime(UTC)
        if deadline <= datetime.now(UTC):
            raise FailedPrecondition("the offer's deadline has passed", "HANDOFF_NOT_OPEN", status="expired")
        if self.recipient is None:
            raise Unavailable("handoffs from peer meshes are not served here", "FEDERATION_OFF")
        agent = await self.recipient(mpb.Party(agent_id=request.target_agent_id))
        status, reason, approval_id = "offered", "", None
        if not await self._may_take(peer, session_id, request.conversation_id, request.generation):
            status, reason = "refused", "this conversation has a session in this mesh already"
        else:
            who = caller(principal, Trust.UNTRUSTED, peer)
            target = agent_target(agent.id, agent.owner, agent.tags, self.settings.mesh)
            verdict = await self.enforcer.decide(
                who, "session.handoff", target, agent_id=agent.id, payload_size=len(state)
            )
            try:
                if verdict.transient:
                    raise Unavailable("the policy engine cannot decide now", "POLICY_UNAVAILABLE")
                if verdict.outcome is Outcome.DENY:
                    status = "refused"
                    reason = "the policy engine refused this handoff: " + "; ".join(verdict.decision.reasons)
                elif verdict.outcome is Outcome.ASK and self.control is None:
                    status = "refused"
                    reason = "this mesh's policy asks for an approval, which cannot be asked for here"
                elif verdict.outcome is Outcome.ASK and self.control is not None:
                    # Held until approved (then offered to the target), as a local offer is; the offering mesh's
                    # deadline still bounds it: past it, that mesh concludes it "aborted" and the approval is moot.
                    approval = await ask_once(
                        self.control,
                        verdict,
                        requested_by=principal.id,
                        action="session.handoff",
                        target=target.uid,
                        agent_id=agent.id,
                        purpose=f"take session {session_id} (conversation {request.conversation_id}) from agent "
                        f"{request.from_agent_id} of peer mesh {peer}",
                    )
                    status, approval_id, reason = held_for(approval)
            finally:
                await verdict.done()
        async with self.pool.acquire() as conn, conn.transaction():
            record = await conn.fetchrow(
                f"""INSERT INTO incoming_handoffs (id, peer, session_id, conversation_id, from_agent, target_agent,
                        target_instance, target_principal, status, status_reason, generation, state, state_sha256,
                        signature, request_hash, note, deadline, approval_id)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
                    ON CONFLICT (id) DO NOTHING RETURNING {_INCOMING}""",
                handoff_id, peer, session_id, request.conversation_id, request.from_agent_id, agent.id,
                target_instance, agent.owner, status, reason[:1024], request.generation, state, digest, signature,
                request_hash, request.note, deadline, approval_id,
            )  # fmt: skip
            # None: sent twice at once (the initiator and its follower); the first one stands.
            row = Incoming.of(record) if record is not None else None
            told = await _tell(self.store, conn, self._notices(row, "offered")) if row and status == "offered" else []
        if row is None:
            first = await self._incoming(handoff_id)
            if first is None or first.peer != peer or not hmac.compare_digest(first.request_hash, request_hash):
                raise AlreadyExists("this handoff id is taken by another offer", "HANDOFF_ID_TAKEN")
            return _status(first)
        log.info("handoff offered by a peer", extra={"handoff_id": request.id, "peer": peer, "status": status})
        await self.notices.publish(told)
        return _status(row)

    async def _may_take(self, peer: str, session_id: uuid.UUID, conversation_id: str, generation: int) -> bool:
        """Whether the session can move here: no session of this id or conversation here, or this very session
        coming back, i.e. held here by the offering peer (handed to it from here before: owner_mesh names it), at a
        generation the offer's is not behind."""
        records = await self.pool.fetch(
            "SELECT id, conversation_id, owner_mesh, generation FROM sessions WHERE conversation_id = $1 OR id = $2",
            conversation_id,
            session_id,
        )
        return not records or (
            len(records) == 1
            and records[0]["id"] == session_id
            and records[0]["conversation_id"] == conversation_id
            and records[0]["owner_mesh"] == peer
            and records[0]["generation"] <= generation
        )

    def _notices(self, row: Incoming, event: str) -> list[NewMessage]:
        handoff = row.as_handoff()
        text = {
            "offered": f"agent {row.from_agent} of peer mesh {row.peer} offers you session {row.session_id} "
            f"(handoff {row.id})",
            "accepted": f"session {row.session_id} is yours: peer mesh {row.peer} committed handoff {row.id}",
        }.get(event, f"handoff {row.id} of session {row.session_id} offered to you: {row.status}")
        return [
            self.notices.tell(handoff, event, row.target_agent, row.target_principal, text, handoff.target_instance)
        ]

    async def _tell_incoming(self, rows: Sequence[Incoming], event: str) -> None:
        told: list[Row] = []
        for row in rows:
            async with self.pool.acquire() as conn, conn.transaction():
                told += await _tell(self.store, conn, self._notices(row, event))
        await self.notices.publish(told)

    async def _incoming(self, handoff_id: uuid.UUID, *, with_state: bool = False) -> Incoming | None:
        columns = _INCOMING if with_state else _INCOMING_NO_STATE
        record = await self.pool.fetchrow(f"SELECT {columns} FROM incoming_handoffs WHERE id = $1", handoff_id)
        return Incoming.of(record) if record is not None else None

    async def _expire_if_late(self, row: Incoming) -> Incoming:
        if row.status != "offered" or row.deadline > datetime.now(UTC):
            return row
        record = await self.pool.fetchrow(
            f"""UPDATE incoming_handoffs SET status = 'expired', status_reason = 'no answer before the deadline',
                    updated_at = now() WHERE id = $1 AND status = 'offered' RETURNING {_INCOMING}""",
            row.id,
        )
        if record is None:
            return await self._incoming(row.id) or row
        expired = Incoming.of(record)
        await self._tell_incoming([expired], "expired")
        return expired

    async def peer_status(self, principal: Principal, handoff_id: str) -> fpb.FederatedHandoffStatus:
        key = model.require_uuid("id", handoff_id)
        row = await self._incoming(key)
        if row is None or row.peer != principal.name:
            raise NotFound(f"handoff {handoff_id} not found", "HANDOFF_NOT_FOUND", id=handoff_id)
        return _status(await self._expire_if_late(row))

    async def conclude(
        self, principal: Principal, request: fpb.ConcludeFederatedHandoffRequest
    ) -> fpb.FederatedHandoffStatus:
        key = model.require_uuid("id", request.id)
        if request.outcome not in ("committed", "aborted"):
            raise invalid("outcome", 'must be "committed" or "aborted"')
        if len(request.reason) > MAX_NOTE:
            raise invalid("reason", f"at most {MAX_NOTE} characters")
        async with self.pool.acquire() as conn, conn.transaction():
            record = await conn.fetchrow(f"SELECT {_INCOMING} FROM incoming_handoffs WHERE id = $1 FOR UPDATE", key)
            if record is None or record["peer"] != principal.name:
                raise NotFound(f"handoff {request.id} not found", "HANDOFF_NOT_FOUND", id=request.id)
            row = Incoming.of(record)
            if request.outcome == "committed":
                if row.status == "accepted":
                    return _status(row)
                if row.status != "prepared":
                    raise FailedPrecondition(
                        f"the handoff is {row.status} here, not prepared", "HANDOFF_NOT_OPEN", status=row.status
                    )
                await self._live(conn, row)
                status, reason, event = "accepted", "", "accepted"
            else:
                if row.status not in ("held", "offered", "prepared"):
                    return _status(row)
                status, reason, event = "aborted", f"{row.peer}: {request.reason or 'aborted'}", "aborted"
            done = Incoming.of(
                await conn.fetchrow(
                    f"""UPDATE incoming_handoffs SET status = $2, status_reason = $3, updated_at = now() WHERE id = $1
                        RETURNING {_INCOMING}""",
                    key,
                    status,
                    reason[:1024],
                )
            )
            # The target was never told of a held offer: nor of its end.
            told = await _tell(self.store, conn, self._notices(done, event)) if row.status != "held" else []
        log.info("handoff from a peer concluded", extra={"handoff_id": request.id, "status": status})
        await self.notices.publish(told)
        return _status(done)

    async def _live(self, conn: asyncpg.Connection, row: Incoming) -> None:
        """B's copy of the session, live: its id and conversation as at A, owned by the target at the generation
        after A's, with its history (the peer's agent, then the target). A session that comes back (handed from
        here to the peer before, so its row here names the peer as its owner's mesh) is taken back the same way:
        its row here gets the new owner, the offer's state and the generation after the offer's."""
        returned = await conn.fetchval(
            """UPDATE sessions SET owner_agent = $3, owner_instance = $4, owner_principal = $5, owner_mesh = '',
                   generation = $6, state = $7, state_sha256 = $8, state_version = state_version + 1, updated_at = now()
               WHERE id = $1 AND conversation_id = $2 AND owner_mesh = $9 AND generation < $6 RETURNING id""",
            row.session_id,
            row.conversation_id,
            row.target_agent,
            row.accepted_instance,
            row.target_principal,
            row.generation + 1,
            row.state,
            row.state_sha256,
            row.peer,
        )
        if returned is not None:
            # The history: the owner in the peer is closed (and recorded, if owners changed there meanwhile).
            await conn.execute(
                "UPDATE session_owners SET until = now() WHERE session_id = $1 AND until IS NULL", row.session_id
            )
            await conn.execute(
                """INSERT INTO session_owners (session_id, generation, agent_id, instance, handoff_id, until)
                   VALUES ($1, $2, $3, '', NULL, now()) ON CONFLICT DO NOTHING""",
                row.session_id,
                row.generation,
                row.from_agent,
            )
            await conn.execute(
                """INSERT INTO session_owners (session_id, generation, agent_id, instance, handoff_id)
                   VALUES ($1, $2, $3, $4, $5)""",
                row.session_id,
                row.generation + 1,
                row.target_agent,
                row.accepted_instance,
                row.id,
            )
            return
        inserted = await conn.fetchval(
            """INSERT INTO sessions (id, conversation_id, owner_agent, owner_instance, owner_principal, generation,
                   state, state_sha256, metadata)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '{}'::jsonb) ON CONFLICT DO NOTHING RETURNING id""",
            row.session_id,
            row.conversation_id,
            row.target_agent,
            row.accepted_instance,
            row.target_principal,
            row.generation + 1,
            row.state,
            row.state_sha256,
        )
        if inserted is None:
            # A session of this conversation was created here since the offer: the peer committed already, so the
            # owner there is this mesh's target; its copy here cannot be made. Said loudly, for an operator.
            log.error("a committed handoff's session cannot be created here", extra={"handoff_id": str(row.id)})
            return
        await conn.execute(
            """INSERT INTO session_owners (session_id, generation, agent_id, instance, handoff_id, until)
               VALUES ($1, $2, $3, '', NULL, now()), ($1, $4, $5, $6, $7, NULL)""",
            row.session_id,
            row.generation,
            row.from_agent,
            row.generation + 1,
            row.target_agent,
            row.accepted_instance,
            row.id,
        )

    # B: its target agent answers (AcceptHandoff, RejectHandoff, GetHandoff of an offer from a peer) ---------------

    async def _mine(self, principal: Principal, handoff_id: str) -> Incoming | None:
        try:
            key = uuid.UUID(handoff_id)
        except ValueError:
            return None
        row = await self._incoming(key)
        if row is None:
            return None
        if not (
            principal.agent_id == row.target_agent
            if principal.kind is Kind.AGENT
            else principal.is_admin or principal.owns(row.target_principal)
        ):
            raise NotFound(f"handoff {handoff_id} not found", "HANDOFF_NOT_FOUND", id=handoff_id)
        return await self._expire_if_late(row)

    async def get(self, principal: Principal, handoff_id: str) -> spb.Handoff | None:
        row = await self._mine(principal, handoff_id)
        if row is None:
            return None
        full = await self._incoming(row.id, with_state=True)
        return _proto(full or row, with_state=True)

    async def accept(self, principal: Principal, request: spb.AcceptHandoffRequest) -> spb.Handoff | None:
        row = await self._mine(principal, request.id)
        if row is None:
            return None
        instance = _label(request.instance, "instance")
        if row.target_instance and instance != row.target_instance:
            raise PermissionDenied(
                f"this handoff is offered to instance {row.target_instance!r}", "NOT_THE_HANDOFF_TARGET"
            )
        if not hmac.compare_digest(_hex("state_sha256", request.state_sha256), row.state_sha256):
            raise FailedPrecondition(
                "the digest presented is not this offer's: accept the offer as it was made", "HANDOFF_INTEGRITY"
            )
        record = await self.pool.fetchrow(
            f"""UPDATE incoming_handoffs SET status = 'prepared', accepted_instance = $2, updated_at = now(),
                    status_reason = 'accepted here; waiting for peer mesh ' || peer || ' to commit'
                WHERE id = $1 AND status = 'offered' AND deadline > clock_timestamp() AND sha256(state) = state_sha256
                RETURNING {_INCOMING_NO_STATE}""",
            row.id,
            instance or row.target_instance,
        )
        if record is not None:
            log.info("handoff from a peer prepared", extra={"handoff_id": request.id})
            return _proto(Incoming.of(record), with_state=False)
        now = await self._incoming(row.id)
        assert now is not None
        if now.status == "offered" and now.deadline > datetime.now(UTC):
            # Still open and in time: its stored state no longer matches its digest.
            await self.pool.execute(
                """UPDATE incoming_handoffs SET status = 'refused', status_reason = 'its state failed the integrity
                       check', updated_at = now() WHERE id = $1 AND status = 'offered'""",
                row.id,
            )
            log.error("a peer's handoff failed its integrity check here", extra={"handoff_id": request.id})
            raise FailedPrecondition(
                "the handoff's state does not match its digest; it was refused", "HANDOFF_INTEGRITY"
            )
        now = await self._expire_if_late(now)
        raise FailedPrecondition(f"the handoff is {now.status}, not offered", "HANDOFF_NOT_OPEN", status=now.status)

    async def reject(self, principal: Principal, request: spb.RejectHandoffRequest) -> spb.Handoff | None:
        row = await self._mine(principal, request.id)
        if row is None:
            return None
        if len(request.reason) > MAX_NOTE:
            raise invalid("reason", f"at most {MAX_NOTE} characters")
        record = await self.pool.fetchrow(
            f"""UPDATE incoming_handoffs SET status = 'rejected', status_reason = $2, updated_at = now()
                WHERE id = $1 AND status = 'offered' RETURNING {_INCOMING_NO_STATE}""",
            row.id,
            request.reason or "rejected by the target",
        )
        if record is None:
            raise FailedPrecondition(f"the handoff is {row.status}, not offered", "HANDOFF_NOT_OPEN", status=row.status)
        return _proto(Incoming.of(record), with_state=False)


def _proto(row: Incoming, *, with_state: bool) -> spb.Handoff:
    answer = handoff_proto(row.as_handoff(), with_state=with_state)
    answer.note = row.note
    return answer


def _safe_label(value: str) -> str:
    return value if _ID.fullmatch(value or "") else ""


def _in_progress(handoff_id: uuid.UUID | None) -> FailedPrecondition:
    return FailedPrecondition(
        "the session has an open handoff; it is answered, cancelled or expires first",
        "HANDOFF_IN_PROGRESS",
        handoff_id=str(handoff_id or ""),
    )
