"""SessionService: conversations' sessions, their owner, and handoffs (policy-checked, signed, one owner at a time)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from agentvault.common import errors
from agentvault.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    invalid,
)
from agentvault.common.interceptors import caller_metadata
from agentvault.common.policy.asking import answer_of, ask_once, held_for, refuse_unless_decided
from agentvault.common.policy.enforcer import ControlPlane, Enforcer
from agentvault.common.policy.engine import Outcome
from agentvault.common.policy.remote import RemoteControlPlane
from agentvault.common.policy.request import Trust, agent_target, caller
from agentvault.common.principal import MESSAGES_SEND, Kind, Principal
from agentvault.common.remote_auth import CallerResolver
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import session_service_pb2 as spb
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc
from agentvault_messaging import model
from agentvault_messaging.agent_lookup import fetch_agent
from agentvault_messaging.events import Hub
from agentvault_messaging.session_store import (
    OPEN,
    Changed,
    HandoffOpen,
    HandoffRow,
    NewHandoff,
    SessionExists,
    SessionRow,
    SessionStore,
)
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import INBOX, NewMessage, Row, Store

if TYPE_CHECKING:
    from agentvault_messaging.session_federation import HandoffsAcrossMeshes

log = logging.getLogger(__name__)

FORMAT_VERSIONS = frozenset({"1"})
DEFAULT_DEADLINE = 300
MAX_METADATA = 32
MAX_NOTE = 1024
MAX_LABEL = 128
MAX_LIST = 100
DEFAULT_LIST = 50
REGISTRY_TIMEOUT = 5.0
STATUSES = ("held", "offered", "accepted", "rejected", "cancelled", "expired", "refused")
_ID = re.compile(r"[\x21-\x7e]{1,128}")
_KEY = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Notices are messages from the mesh itself, in the agents' inboxes; their ids are derived from the handoff and the
# event, so a notice sent twice is stored once.
NOTICE_NAMESPACE = uuid.UUID("0b7f6c52-5a0c-4d6e-a3f1-6c1d2b8e9a47")
NOTICE_SENDER = 'Caller::Service::"svc-messaging"'
HANDOFF_HEADER = "agentvault-handoff"
EVENT_HEADER = "agentvault-handoff-event"


def digest_of(state: bytes) -> bytes:
    return hashlib.sha256(state).digest()


def sign(key: bytes, handoff_id: uuid.UUID, session_id: uuid.UUID, generation: int, digest: bytes) -> bytes:
    """HMAC-SHA256 over the handoff, its session, the generation it was offered at and the state's digest: a
    signature of one offer, which no other offer (nor the same state at another generation) carries."""
    message = b"av-handoff-v1\x00" + handoff_id.bytes + session_id.bytes + generation.to_bytes(8, "big") + digest
    return hmac.new(key, message, hashlib.sha256).digest()


def check_state(state: str, limit: int, path: str) -> bytes:
    """The state document's bytes: a JSON object with a known format_version, at most `limit` bytes."""
    raw = state.encode()
    if len(raw) > limit:
        raise ResourceExhausted(
            f"{path} is {len(raw)} bytes; at most {limit} (MESSAGING_SESSION_MAX_BYTES)",
            "SESSION_STATE_TOO_LARGE",
            limit=str(limit),
        )
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise invalid(path, f"is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise invalid(path, "must be a JSON object")
    if document.get("format_version") not in FORMAT_VERSIONS:
        raise invalid(path, f'must carry "format_version": one of {sorted(FORMAT_VERSIONS)}')
    return raw


def _label(value: str, path: str) -> str:
    if value and not _ID.fullmatch(value):
        raise invalid(path, f"must be 1 to {MAX_LABEL} printable ASCII characters without spaces")
    return value


# An instance label wherever one is named (a session's owner, a handoff's target, a receiver: servicer.py).
instance_label = _label


def _uuid(path: str, value: str) -> uuid.UUID:
    return model.require_uuid(path, value)


def _stamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def session_proto(row: SessionRow, *, with_state: bool) -> spb.Session:
    answer = spb.Session(
        id=str(row.id),
        conversation_id=row.conversation_id,
        state=row.state.decode() if with_state else "",
        metadata=json.loads(row.metadata),
        owner_agent_id=row.owner_agent,
        owner_instance=row.owner_instance,
        generation=row.generation,
        state_version=row.state_version,
        state_sha256=row.state_sha256.hex(),
        open_handoff_id=str(row.open_handoff) if row.open_handoff else "",
        owner_mesh=row.owner_mesh,
        create_time=_stamp(row.created_at),
        update_time=_stamp(row.updated_at),
    )
    return answer


def handoff_proto(row: HandoffRow, *, with_state: bool) -> spb.Handoff:
    answer = spb.Handoff(
        id=str(row.id),
        session_id=str(row.session_id),
        conversation_id=row.conversation_id,
        from_agent_id=row.from_agent,
        from_instance=row.from_instance,
        target=spb.HandoffTarget(agent_id=row.target_agent, instance=row.target_instance, mesh=row.target_mesh),
        status=row.status,
        status_reason=row.status_reason,
        base_generation=row.base_generation,
        state=row.state.decode() if with_state else "",
        state_sha256=row.state_sha256.hex(),
        signature=row.signature.hex(),
        state_size=row.size,
        approval_id=str(row.approval_id) if row.approval_id else "",
        note=row.note,
        accepted_instance=row.accepted_instance,
        create_time=_stamp(row.created_at),
        update_time=_stamp(row.updated_at),
    )
    deadline = _stamp(row.deadline)
    if deadline is not None:
        answer.deadline.CopyFrom(deadline)
    return answer


class Notices:
    """Tells agents about handoffs by a message from the mesh in their inbox (header agentvault-handoff, a data
    part with the handoff): agents learn of them through the inbox or stream they already read. The session store
    stores the notices `of` a handoff in the transaction that changes it; `publish` wakes the readers after."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def tell(
        self, handoff: HandoffRow, event: str, agent_id: str, owner: str, text: str, instance: str = ""
    ) -> NewMessage:
        """A notice to `agent_id`, addressed to its `instance` when the handoff names one (per-instance inboxes:
        only that instance, or a receiver naming it, takes it)."""
        data = struct_pb2.Value()
        data.struct_value.update(
            {
                "handoff_id": str(handoff.id),
                "session_id": str(handoff.session_id),
                "conversation_id": handoff.conversation_id,
                "event": event,
                "status": handoff.status,
                "status_reason": handoff.status_reason,
                "from_agent_id": handoff.from_agent,
                "target_agent_id": handoff.target_agent,
                "target_instance": handoff.target_instance,
                "state_sha256": handoff.state_sha256.hex(),
                "signature": handoff.signature.hex(),
                "state_size": handoff.size,
                "deadline": handoff.deadline.isoformat() if handoff.deadline else "",
                "note": handoff.note,
            }
        )
        message = mpb.Message(
            format_version="1",
            recipient=mpb.Party(agent_id=agent_id),
            parts=[mpb.Part(text=text), mpb.Part(data=data, media_type="application/json")],
            headers={HANDOFF_HEADER: str(handoff.id), EVENT_HEADER: event},
        )
        body = message.SerializeToString()
        # Their own conversation, so that a later acceptance never moves a notice with the session's messages.
        return NewMessage(
            id=uuid.uuid5(NOTICE_NAMESPACE, f"{handoff.id}:{event}:{agent_id}"),
            sender=NOTICE_SENDER,
            sender_kind=Kind.SERVICE.value,
            sender_id="svc-messaging",
            sender_agent="",
            sender_inbox="service:svc-messaging",
            inbox=f"agent:{agent_id}",
            recipient_agent=agent_id,
            recipient_owner=owner,
            recipient_mesh="",
            transport=INBOX,
            endpoint="",
            conversation_id=f"handoff:{handoff.id}",
            correlation_id=str(handoff.id),
            in_reply_to=None,
            idempotency_key=None,
            request_hash=hashlib.sha256(body).digest(),
            body=body,
            status="accepted",
            approval_id=None,
            expire_at=None,
            recipient_instance=instance,
        )

    def of(self, handoff: HandoffRow) -> list[NewMessage]:
        """The notices a handoff as it now is calls for: the target learns of an offer; the initiator learns how its
        offer ended (accepted, rejected, expired, refused); the target of an offer withdrawn or expired that it was
        told of learns it too. A held offer tells no one yet."""
        if handoff.status == "held":
            return []
        if handoff.target_mesh:
            # An agent of a peer mesh is told there (session_federation.py); here only the initiator, of the end.
            return [] if handoff.status == "offered" else self._told_of_end(handoff)
        if handoff.status == "offered":
            return [
                self.tell(
                    handoff,
                    "offered",
                    handoff.target_agent,
                    handoff.target_principal,
                    f"agent {handoff.from_agent} offers you session {handoff.session_id} (handoff {handoff.id})",
                    handoff.target_instance,
                )
            ]
        told = [
            self.tell(
                handoff,
                handoff.status,
                handoff.from_agent,
                handoff.from_principal,
                f"handoff {handoff.id} of session {handoff.session_id}: {handoff.status}"
                + (f" ({handoff.status_reason})" if handoff.status_reason else ""),
                handoff.from_instance,
            )
        ]
        if handoff.status in ("cancelled", "expired") and handoff.target_agent != handoff.from_agent:
            told.append(
                self.tell(
                    handoff,
                    handoff.status,
                    handoff.target_agent,
                    handoff.target_principal,
                    f"handoff {handoff.id} of session {handoff.session_id} offered to you: {handoff.status}",
                    handoff.target_instance,
                )
            )
        return told

    def _told_of_end(self, handoff: HandoffRow) -> list[NewMessage]:
        return [
            self.tell(
                handoff,
                handoff.status,
                handoff.from_agent,
                handoff.from_principal,
                f"handoff {handoff.id} of session {handoff.session_id} to peer mesh {handoff.target_mesh}: "
                + handoff.status
                + (f" ({handoff.status_reason})" if handoff.status_reason else ""),
                handoff.from_instance,
            )
        ]

    async def publish(self, told: list[Row]) -> None:
        """Wakes the notices' readers, after the commit that stored them (a wake-up lost is caught up by polling)."""
        if told:
            await self.hub.publish(told)


class SessionRouter:
    """The send path's hook: a message of a conversation whose session moved on goes to the session's owner."""

    def __init__(self, sessions: SessionStore) -> None:
        self.sessions = sessions

    async def route(self, conversation_id: str, agent_id: str) -> tuple[str, str]:
        """The agent a message of `conversation_id` to `agent_id` goes to, and the instance it is addressed to: the
        session's current owner and its instance when `agent_id` owns it or owned it before, else `agent_id` itself
        and "" (any instance)."""
        if not conversation_id or not agent_id:
            return agent_id, ""
        return await self.sessions.current_owner(conversation_id, agent_id) or (agent_id, "")


class HandoffApprovals:
    """Held handoffs released by their approvals (called by delivery.ApprovalFollower, which follows them all)."""

    # Handoffs across meshes (session_federation.py, set by __main__): an approved offer to a peer's agent is sent
    # there; offers from peers held by this mesh's "ask" are released alike.
    across: HandoffsAcrossMeshes | None = None

    def __init__(self, sessions: SessionStore, notices: Notices, control: ControlPlane) -> None:
        self.sessions = sessions
        self.notices = notices
        self.control = control

    async def held(self, limit: int) -> list[uuid.UUID]:
        held = await self.sessions.held(limit)
        if self.across is not None:
            held += await self.across.held(limit)
        return held

    async def apply(self, approval: ppb.Approval) -> None:
        if approval.status == "pending" or approval.action != "session.handoff":
            return
        approved, reason = await answer_of(self.control, approval)
        await self.release(uuid.UUID(approval.id), approved, reason)

    async def release(self, approval_id: uuid.UUID, approved: bool, reason: str) -> None:
        released, told = await self.sessions.release(approval_id, approved, reason, self.notices.of)
        for handoff in released:
            log.info("held handoff released", extra={"handoff_id": str(handoff.id), "status": handoff.status})
        await self.notices.publish(told)
        if self.across is not None:
            await self.across.released(approval_id, approved, reason, released)


class HandoffSweeper:
    """Expires offers past their deadline (every replica; each statement takes its own rows). Nothing moves."""

    def __init__(self, sessions: SessionStore, notices: Notices, every: float) -> None:
        self.sessions = sessions
        self.notices = notices
        self.every = every

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("handoff sweep failed: %s", exc)
            await asyncio.sleep(self.every)

    async def sweep(self, handoff_id: uuid.UUID | None = None) -> list[HandoffRow]:
        expired, told = await self.sessions.expire(1000, handoff_id, self.notices.of)
        await self.notices.publish(told)
        return expired


class SessionServicer:
    # Handoffs across meshes (session_federation.HandoffsAcrossMeshes), when federation is configured.
    across: HandoffsAcrossMeshes | None = None

    def __init__(
        self,
        settings: MessagingSettings,
        sessions: SessionStore,
        notices: Notices,
        sweeper: HandoffSweeper,
        callers: CallerResolver,
        registry: reg_grpc.RegistryServiceAsyncStub,
        enforcer: Enforcer,
        control: RemoteControlPlane,
        store: Store,
        hub: Hub,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.notices = notices
        self.sweeper = sweeper
        self.callers = callers
        self.registry = registry
        self.enforcer = enforcer
        self.control = control
        self.store = store
        self.hub = hub

    # Who is calling ----------------------------------------------------------------------------------------

    async def _agent_caller(self, context: grpc.aio.ServicerContext) -> Principal:
        """Sessions are held by agents: the caller is an agent (its own credential) with messages:send."""
        principal = (await self.callers.require_scope(context.invocation_metadata(), MESSAGES_SEND)).principal
        if principal.kind is not Kind.AGENT or not principal.agent_id:
            raise PermissionDenied("only an agent holds sessions (call with the agent's credential)", "NOT_AN_AGENT")
        return principal

    async def _reader(self, context: grpc.aio.ServicerContext) -> Principal:
        return (await self.callers.require(context.invocation_metadata())).principal

    async def _visible(
        self, principal: Principal, session_id: str, path: str = "id", *, with_state: bool = False
    ) -> SessionRow:
        """The session when the caller may see it (its owner, a former owner or target, the owner agent's owner,
        an admin); NotFound otherwise, as for a session that does not exist."""
        key = _uuid(path, session_id)
        row = await self.sessions.get(key, with_state=with_state)
        if row is not None:
            if principal.kind is Kind.AGENT:
                if row.owner_agent == principal.agent_id or await self.sessions.was_owner(key, principal.agent_id):
                    return row
            elif principal.is_admin or principal.owns(row.owner_principal):
                return row
        raise NotFound(f"session {session_id} not found", "SESSION_NOT_FOUND", id=session_id)

    @staticmethod
    def _sees_state(principal: Principal, row: SessionRow) -> bool:
        if principal.kind is Kind.AGENT:
            return row.owner_agent == principal.agent_id
        return principal.is_admin or principal.owns(row.owner_principal)

    async def _target_agent(self, agent_id: str, context: grpc.aio.ServicerContext) -> reg_pb.Agent:
        """The target as the caller may see it (its credential forwarded: a private agent of someone else is not
        found)."""
        model.require_uuid("target.agent_id", agent_id)
        return await fetch_agent(self.registry, agent_id, tuple(caller_metadata(context)))

    # Sessions ----------------------------------------------------------------------------------------------

    async def CreateSession(self, request: spb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> spb.Session:
        principal = await self._agent_caller(context)
        if not request.HasField("session"):
            raise invalid("session", "is required")
        given = request.session
        if not _ID.fullmatch(given.conversation_id):
            raise invalid("session.conversation_id", "must be 1 to 128 printable ASCII characters without spaces")
        instance = _label(given.owner_instance, "session.owner_instance")
        state = check_state(given.state or '{"format_version":"1"}', self.settings.session_max_bytes, "session.state")
        if len(given.metadata) > MAX_METADATA:
            raise invalid("session.metadata", f"at most {MAX_METADATA} entries")
        for k, v in given.metadata.items():
            if not _KEY.fullmatch(k) or len(v) > MAX_NOTE:
                raise invalid(f"session.metadata[{k[:64]}]", "keys: [A-Za-z0-9._-]{1,128}; values: 1024 characters")
        try:
            row = await self.sessions.create(
                uuid.uuid4(),
                given.conversation_id,
                principal.agent_id,
                instance,
                principal.id,
                state,
                digest_of(state),
                dict(given.metadata),
            )
        except SessionExists:
            raise AlreadyExists(
                f"conversation {given.conversation_id} has a session already", "SESSION_EXISTS"
            ) from None
        log.info("session created", extra={"session_id": str(row.id), "owner": principal.agent_id})
        return session_proto(row, with_state=True)

    async def GetSession(self, request: spb.GetSessionRequest, context: grpc.aio.ServicerContext) -> spb.Session:
        principal = await self._reader(context)
        row = await self._visible(principal, request.id, with_state=True)
        return session_proto(row, with_state=self._sees_state(principal, row))

    async def UpdateSessionState(
        self, request: spb.UpdateSessionStateRequest, context: grpc.aio.ServicerContext
    ) -> spb.Session:
        principal = await self._agent_caller(context)
        key = _uuid("id", request.id)
        state = check_state(request.state, self.settings.session_max_bytes, "state")
        if request.state_version < 0:
            raise invalid("state_version", "must not be negative")
        try:
            row = await self.sessions.update_state(
                key, principal.agent_id, state, digest_of(state), request.state_version
            )
        except Changed as exc:
            raise self._changed(exc, request.id, principal) from None
        return session_proto(row, with_state=True)

    async def ListSessionOwners(
        self, request: spb.ListSessionOwnersRequest, context: grpc.aio.ServicerContext
    ) -> spb.ListSessionOwnersResponse:
        principal = await self._reader(context)
        row = await self._visible(principal, request.id)
        owners = [
            spb.SessionOwner(
                agent_id=r["agent_id"],
                instance=r["instance"],
                generation=r["generation"],
                handoff_id=str(r["handoff_id"]) if r["handoff_id"] else "",
                since=_stamp(r["since"]),
                until=_stamp(r["until"]),
            )
            for r in await self.sessions.owners(row.id)
        ]
        return spb.ListSessionOwnersResponse(owners=owners)

    # Handoffs ----------------------------------------------------------------------------------------------

    async def InitiateHandoff(
        self, request: spb.InitiateHandoffRequest, context: grpc.aio.ServicerContext
    ) -> spb.Handoff:
        principal = await self._agent_caller(context)
        key = _uuid("session_id", request.session_id)
        if not request.HasField("target"):
            raise invalid("target", "is required")
        target = request.target
        if target.mesh and self.across is not None:
            return await self.across.initiate(principal, request)
        if target.mesh:
            raise errors.AgentVaultError(
                "handoffs to agents of peer meshes are not available yet",
                "HANDOFF_ACROSS_MESHES_UNAVAILABLE",
                {},
                grpc.StatusCode.UNIMPLEMENTED,
            )
        model.require_uuid("target.agent_id", target.agent_id)
        target_instance = _label(target.instance, "target.instance")
        instance = _label(request.instance, "instance")
        if len(request.note) > MAX_NOTE:
            raise invalid("note", f"at most {MAX_NOTE} characters")
        limit = self.settings.handoff_max_seconds
        seconds = request.deadline_seconds or min(DEFAULT_DEADLINE, limit)
        if not 1 <= seconds <= limit:
            raise invalid("deadline_seconds", f"must be from 1 to {limit} (MESSAGING_HANDOFF_MAX_SECONDS)")
        session = await self._visible(principal, request.session_id, "session_id", with_state=not request.state)
        if session.owner_agent != principal.agent_id:
            raise PermissionDenied("only the session's owner hands it off", "NOT_THE_SESSION_OWNER")
        if target.agent_id == session.owner_agent and target_instance == session.owner_instance:
            raise invalid("target", "is the session's owner already")
        state = check_state(request.state, self.settings.session_max_bytes, "state") if request.state else session.state
        # Answered before the policy is asked, so that a second offer makes no approval; the insert decides.
        if session.open_handoff is not None:
            raise _in_progress(session.open_handoff)
        agent = await self._target_agent(target.agent_id, context)
        who = caller(principal, Trust.UNTRUSTED, self.settings.mesh)
        policy_target = agent_target(agent.id, agent.owner, agent.tags, self.settings.mesh)
        verdict = await self.enforcer.decide(
            who, "session.handoff", policy_target, agent_id=agent.id, payload_size=len(state)
        )
        try:
            refuse_unless_decided(verdict, "this handoff", "HANDOFF_DENIED")
            status, approval_id, reason = "offered", None, ""
            if verdict.outcome is Outcome.ASK:
                approval = await ask_once(
                    self.control,
                    verdict,
                    requested_by=principal.id,
                    action="session.handoff",
                    target=policy_target.uid,
                    agent_id=agent.id,
                    purpose=f"hand session {session.id} (conversation {session.conversation_id}) to agent {agent.id}",
                )
                status, approval_id, reason = held_for(approval)
            handoff_id = uuid.uuid4()
            digest = digest_of(state)
            new = NewHandoff(
                id=handoff_id,
                session_id=key,
                from_agent=principal.agent_id,
                from_instance=instance or session.owner_instance,
                from_principal=principal.id,
                target_agent=agent.id,
                target_instance=target_instance,
                target_principal=agent.owner,
                status=status,
                status_reason=reason,
                base_generation=session.generation,
                state=state,
                state_sha256=digest,
                signature=sign(self.settings.session_key, handoff_id, key, session.generation, digest),
                approval_id=approval_id,
                note=request.note,
                deadline_seconds=seconds,
            )
            try:
                row, told = await self.sessions.offer(new, self.notices.of)
            except HandoffOpen:
                raise _in_progress(None) from None
            except Changed as exc:
                raise self._changed(exc, request.session_id, principal) from None
        finally:
            await verdict.done()
        log.info(
            "handoff initiated",
            extra={"handoff_id": str(row.id), "session_id": str(key), "target": agent.id, "status": row.status},
        )
        await self.notices.publish(told)
        return handoff_proto(row, with_state=False)

    async def _own_handoff(self, principal: Principal, handoff_id: str, *, with_state: bool) -> HandoffRow:
        key = _uuid("id", handoff_id)
        row = await self.sessions.handoff(key, with_state=with_state)
        if row is not None and row.status == "offered" and row.deadline and row.deadline <= datetime.now(UTC):
            # Expired lazily too, so that an answer never depends on the sweeper having run.
            await self.sweeper.sweep(key)
            row = await self.sessions.handoff(key, with_state=with_state)
        if row is None or not (
            principal.agent_id in (row.from_agent, row.target_agent)
            if principal.kind is Kind.AGENT
            else principal.is_admin or principal.owns(row.from_principal) or principal.owns(row.target_principal)
        ):
            raise NotFound(f"handoff {handoff_id} not found", "HANDOFF_NOT_FOUND", id=handoff_id)
        return row

    async def AcceptHandoff(self, request: spb.AcceptHandoffRequest, context: grpc.aio.ServicerContext) -> spb.Handoff:
        principal = await self._agent_caller(context)
        if self.across is not None and (prepared := await self.across.accept(principal, request)) is not None:
            return prepared  # an offer from a peer mesh: "prepared" until the peer commits it
        row = await self._own_handoff(principal, request.id, with_state=False)
        if row.target_agent != principal.agent_id:
            raise PermissionDenied("only the handoff's target accepts it", "NOT_THE_HANDOFF_TARGET")
        instance = _label(request.instance, "instance")
        if row.target_instance and instance != row.target_instance:
            raise PermissionDenied(
                f"this handoff is offered to instance {row.target_instance!r}", "NOT_THE_HANDOFF_TARGET"
            )
        presented = (_hex("state_sha256", request.state_sha256), _hex("signature", request.signature))
        key = self.settings.session_key

        def check(handoff: HandoffRow, digest_matches: bool) -> None:
            # The state against its digest (by the database), then constant-time: the digest and signature against
            # the mesh's key, and both against what the target was offered.
            expected = sign(key, handoff.id, handoff.session_id, handoff.base_generation, handoff.state_sha256)
            if not (hmac.compare_digest(expected, handoff.signature) and digest_matches):
                raise _Tampered()
            same = hmac.compare_digest(presented[0], handoff.state_sha256) & hmac.compare_digest(
                presented[1], handoff.signature
            )
            if not same:
                raise FailedPrecondition(
                    "the digest or signature presented is not this offer's: accept the offer as it was made",
                    "HANDOFF_INTEGRITY",
                )

        try:
            accepted = await self.sessions.accept(
                row.id, row.session_id, instance or row.target_instance, check, self.notices.of
            )
        except _Tampered:
            _, told = await self.sessions.settle(
                row.id, OPEN, "refused", "its state failed the integrity check", self.notices.of
            )
            log.error("a handoff's state failed its integrity check", extra={"handoff_id": str(row.id)})
            await self.notices.publish(told)
            raise FailedPrecondition(
                "the handoff's state does not match its digest and signature; it was refused", "HANDOFF_INTEGRITY"
            ) from None
        except Changed as exc:
            if exc.why == "late":
                await self.sweeper.sweep(row.id)
                raise FailedPrecondition("the handoff expired", "HANDOFF_NOT_OPEN", status="expired") from None
            if exc.why == "generation":
                _, told = await self.sessions.settle(
                    row.id, OPEN, "refused", "the session changed owner since", self.notices.of
                )
                await self.notices.publish(told)
                raise Aborted("the session changed owner since this offer", "SESSION_CHANGED") from None
            status = exc.why.removeprefix("status:")
            raise FailedPrecondition(
                f"the handoff is {status}, not offered", "HANDOFF_NOT_OPEN", status=status
            ) from None
        log.info(
            "handoff accepted",
            extra={
                "handoff_id": str(row.id),
                "session_id": str(row.session_id),
                "owner": principal.agent_id,
                "generation": accepted.session.generation,
                "moved": len(accepted.moved),
            },
        )
        moved = [m for m in [await self.store.get(i) for i in accepted.moved] if m is not None]
        if moved:
            await self.hub.publish(moved)
        await self.notices.publish(accepted.told)
        return handoff_proto(accepted.handoff, with_state=False)

    async def RejectHandoff(self, request: spb.RejectHandoffRequest, context: grpc.aio.ServicerContext) -> spb.Handoff:
        principal = await self._agent_caller(context)
        if len(request.reason) > MAX_NOTE:
            raise invalid("reason", f"at most {MAX_NOTE} characters")
        if self.across is not None and (rejected := await self.across.reject(principal, request)) is not None:
            return rejected
        row = await self._own_handoff(principal, request.id, with_state=False)
        if row.target_agent != principal.agent_id:
            raise PermissionDenied("only the handoff's target rejects it", "NOT_THE_HANDOFF_TARGET")
        done, told = await self.sessions.settle(
            row.id, OPEN, "rejected", request.reason or "rejected by the target", self.notices.of
        )
        if done is None:
            raise _not_open(await self.sessions.handoff(row.id, with_state=False))
        await self.notices.publish(told)
        return handoff_proto(done, with_state=False)

    async def CancelHandoff(self, request: spb.CancelHandoffRequest, context: grpc.aio.ServicerContext) -> spb.Handoff:
        principal = await self._agent_caller(context)
        row = await self._own_handoff(principal, request.id, with_state=False)
        if row.from_agent != principal.agent_id:
            raise PermissionDenied("only the handoff's initiator cancels it", "NOT_THE_HANDOFF_INITIATOR")
        # Told only of an offer made (a held one was never told of), as it was when cancelled, not as read before.
        done, told = await self.sessions.settle(
            row.id, OPEN, "cancelled", "withdrawn by the initiator", self.notices.of, tell_if=("offered",)
        )
        if done is None:
            raise _not_open(await self.sessions.handoff(row.id, with_state=False))
        await self.notices.publish(told)
        return handoff_proto(done, with_state=False)

    async def GetHandoff(self, request: spb.GetHandoffRequest, context: grpc.aio.ServicerContext) -> spb.Handoff:
        principal = await self._reader(context)
        if self.across is not None and (incoming := await self.across.get(principal, request.id)) is not None:
            return incoming
        row = await self._own_handoff(principal, request.id, with_state=True)
        return handoff_proto(row, with_state=True)

    async def ListHandoffs(
        self, request: spb.ListHandoffsRequest, context: grpc.aio.ServicerContext
    ) -> spb.ListHandoffsResponse:
        principal = await self._reader(context)
        if request.status and request.status not in STATUSES:
            raise invalid("status", f"must be one of {', '.join(STATUSES)}")
        if not 0 <= request.page_size <= MAX_LIST:
            raise invalid("page_size", f"must be from 0 to {MAX_LIST}")
        size = request.page_size or DEFAULT_LIST
        session_id: uuid.UUID | None = None
        agent_id: str | None = None
        if request.session_id:
            session_id = (await self._visible(principal, request.session_id, "session_id")).id
        elif principal.kind is Kind.AGENT:
            agent_id = principal.agent_id
        elif not principal.is_admin:
            raise invalid("session_id", "is required unless the caller is an agent or an admin")
        rows = await self.sessions.handoffs(session_id=session_id, agent_id=agent_id, status=request.status, limit=size)
        return spb.ListHandoffsResponse(handoffs=[handoff_proto(r, with_state=False) for r in rows])

    # Errors ------------------------------------------------------------------------------------------------

    def _changed(self, exc: Changed, session_id: str, principal: Principal) -> errors.AgentVaultError:
        if exc.why == "missing":
            return NotFound(f"session {session_id} not found", "SESSION_NOT_FOUND", id=session_id)
        if exc.why == "not_owner":
            return PermissionDenied("only the session's owner may do this", "NOT_THE_SESSION_OWNER")
        if exc.why == "open":
            return _in_progress(exc.session.open_handoff if exc.session else None)
        if exc.why == "state_version":
            current = exc.session.state_version if exc.session else 0
            return Aborted(
                f"the session's state changed (state_version is {current}); read it again",
                "SESSION_STATE_CHANGED",
                state_version=str(current),
            )
        return Aborted("the session changed owner meanwhile; read it again", "SESSION_CHANGED")


class _Tampered(Exception):
    """A stored handoff whose state does not match its digest and signature."""


def _hex(path: str, value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise invalid(path, "must be hex, as the offer gave it") from None
    if len(raw) != hashlib.sha256().digest_size:
        raise invalid(path, "must be 64 hex digits, as the offer gave it")
    return raw


def _in_progress(handoff_id: uuid.UUID | None) -> FailedPrecondition:
    return FailedPrecondition(
        "the session has an open handoff; it is answered, cancelled or expires first",
        "HANDOFF_IN_PROGRESS",
        handoff_id=str(handoff_id or ""),
    )


def _not_open(row: HandoffRow | None) -> FailedPrecondition:
    status = row.status if row else "gone"
    return FailedPrecondition(f"the handoff is {status}, no longer open", "HANDOFF_NOT_OPEN", status=status)
