"""MessagingService: sends through the policy engine, inboxes, replies, status, dead letters."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import empty_pb2, json_format

from agentvault.common import errors, pagination, tracing
from agentvault.common.enums import enum_words
from agentvault.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    invalid,
)
from agentvault.common.policy.asking import ask_once, held_for, refuse_unless_decided
from agentvault.common.policy.enforcer import Enforcer
from agentvault.common.policy.engine import Outcome
from agentvault.common.policy.remote import RemoteControlPlane
from agentvault.common.policy.request import Trust, agent_target, caller
from agentvault.common.principal import ADMIN_SCOPE, MESSAGES_SEND, Kind, Principal
from agentvault.common.remote_auth import CallerResolver, check_scope
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc
from agentvault_messaging import acks, metrics, model
from agentvault_messaging.agent_lookup import AgentLookup
from agentvault_messaging.events import Hub, Watcher
from agentvault_messaging.federation import FEDERATION, PeerBook, peer_inbox
from agentvault_messaging.parts import PartStreams
from agentvault_messaging.schema import message_schema
from agentvault_messaging.session_federation import HandoffsAcrossMeshes
from agentvault_messaging.sessions import SessionRouter, instance_label
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import INBOX, Holder, IdempotencyConflict, NewMessage, Row, Store, holds
from agentvault_messaging.transports.base import Transport, choose

log = logging.getLogger(__name__)

PROTOCOL = enum_words(reg_pb.Protocol.DESCRIPTOR)
REGISTRY_TIMEOUT = 5.0
MAX_WAIT_SECONDS = 60
MAX_LONG_POLL = 20
MAX_RECEIVE = 100
DEFAULT_RECEIVE = 10
MAX_VISIBILITY = 43_200
DEFAULT_VISIBILITY = 30
MAX_IN_FLIGHT = 1000
DEFAULT_IN_FLIGHT = 100
# Answers waiting for a slow Converse reader: deliveries are up to MESSAGING_MAX_MESSAGE_BYTES each, so a few.
CONVERSE_QUEUE = 8
# How long a recipient looked up for one credential is reused: a change of the agent (its endpoints, tags, owner,
# sharing) or of the credential reaches sends within this time.


def inbox_of(principal: Principal) -> str:
    """The inbox of a caller: an agent's by its registered id, anyone else's by principal id."""
    if principal.kind is Kind.AGENT and principal.agent_id:
        return f"agent:{principal.agent_id}"
    return f"{principal.kind.value}:{principal.id}"


def agent_inbox(agent_id: str) -> str:
    return f"agent:{agent_id}"


def _seconds(value: int, field: str, default: int, maximum: int, minimum: int = 1) -> int:
    if value == 0:
        return default
    if not minimum <= value <= maximum:
        raise invalid(field, f"must be from {minimum} to {maximum}")
    return value


@dataclass(frozen=True)
class Route:
    inbox: str
    agent_id: str
    owner: str
    transport: str
    endpoint: str
    mesh: str = ""  # the peer mesh of a recipient there (federation.py)


class MessagingServicer:
    def __init__(
        self,
        settings: MessagingSettings,
        store: Store,
        hub: Hub,
        callers: CallerResolver,
        registry: reg_grpc.RegistryServiceAsyncStub,
        enforcer: Enforcer,
        control: RemoteControlPlane,
        transports: dict[str, Transport],
        parts: PartStreams | None = None,
    ) -> None:
        self.parts = parts
        self.settings = settings
        self.store = store
        self.hub = hub
        self.callers = callers
        self.registry = registry
        self.enforcer = enforcer
        self.control = control
        self.transports = transports
        # The peers, for messages to agents of peer meshes (set by __main__; None: such messages are refused).
        self.peers: PeerBook | None = None
        # Session handoffs' routing (set by __main__): a conversation's messages follow its session's owner.
        self.sessions: SessionRouter | None = None
        # Conversations whose session moved to a peer mesh (session_federation.py).
        self.handoffs_away: HandoffsAcrossMeshes | None = None
        # Recipients as each credential sees them, briefly: a send costs no registry call while they are fresh.
        self.agents = AgentLookup(registry)

    # Who is calling ----------------------------------------------------------------------------------------

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return (await self.callers.require(context.invocation_metadata())).principal

    async def _agent(self, agent_id: str, context: grpc.aio.ServicerContext, path: str) -> reg_pb.Agent:
        """The agent as the caller may see it (its credential forwarded: a private agent of someone else is not
        found); kept a moment per credential (agent_lookup.py)."""
        model.require_uuid(path, agent_id)
        return await self.agents.get(agent_id, context)

    async def _inbox(self, principal: Principal, agent_id: str, context: grpc.aio.ServicerContext) -> str:
        """The inbox the caller may read: its own, or an agent's when it is that agent, its owner or an admin.
        An agent's credential names its owner, but an agent reads only its own inbox, never its siblings'."""
        if not agent_id:
            return inbox_of(principal)
        if principal.kind is Kind.AGENT:
            if principal.agent_id == agent_id:
                return agent_inbox(agent_id)
            raise PermissionDenied("an agent reads only its own inbox", "INBOX_NOT_YOURS")
        agent = await self._agent(agent_id, context, "agent_id")
        if not (principal.is_admin or principal.owns(agent.owner)):
            raise PermissionDenied(
                f"only agent {agent_id} itself, its owner or an admin may read its inbox", "INBOX_NOT_YOURS"
            )
        return agent_inbox(agent_id)

    def _may_see(self, principal: Principal, row: Row) -> bool:
        """An agent sees what it sent and what came to its inbox; a person also what its agents sent and what came
        to agents it owns (an agent's credential names its owner as principal id); an admin everything."""
        if inbox_of(principal) in (row.inbox, row.sender_inbox):
            return True
        if principal.kind is Kind.AGENT:
            return False
        return principal.is_admin or principal.id in (row.sender_id, row.recipient_owner)

    @staticmethod
    def _viewer(principal: Principal) -> tuple[str, ...] | None:
        """What `Store.page` and watches may show the caller (None: everything)."""
        if principal.kind is Kind.AGENT:
            return (inbox_of(principal),)
        return None if principal.is_admin else (principal.id, inbox_of(principal))

    # Sending -----------------------------------------------------------------------------------------------

    def _route(self, agent: reg_pb.Agent) -> Route:
        endpoints = [(PROTOCOL.word(e.protocol) or "", e.url) for e in agent.endpoints]
        chosen = choose(self.transports, endpoints)
        transport, endpoint = chosen if chosen is not None else (INBOX, "")
        return Route(agent_inbox(agent.id), agent.id, agent.owner, transport, endpoint)

    async def SendMessage(
        self, request: mpb.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> mpb.SendMessageResponse:
        principal = (await self.callers.require_scope(context.invocation_metadata(), MESSAGES_SEND)).principal
        if not request.HasField("message"):
            raise invalid("message", "is required")
        return await self.send(principal, request.message, context)

    async def send(
        self, principal: Principal, message: mpb.Message, context: grpc.aio.ServicerContext
    ) -> mpb.SendMessageResponse:
        started = time.perf_counter()
        model.check(message, self.settings.max_message_bytes)
        who = caller(principal, Trust.UNTRUSTED, self.settings.mesh)
        message_id = uuid.UUID(message.id) if message.id else uuid.uuid4()
        body, digest = model.stored(message)
        key = message.idempotency_key or None
        # A repeated send is answered before the policy is asked again (which could create a second approval).
        repeated = await self.store.find_repeat(who.uid, message_id if message.id else None, key)
        if repeated is not None:
            return self._repeat(repeated, who.uid, digest)
        original: Row | None = None
        if message.in_reply_to:
            original = await self.store.get(uuid.UUID(message.in_reply_to))
            if original is None or not self._may_see(principal, original):
                raise NotFound(f"message {message.in_reply_to} not found", "MESSAGE_NOT_FOUND")
            if not _holds(principal, original):
                raise PermissionDenied(
                    "only the recipient of a message (or its owner) may reply to it", "NOT_THE_RECIPIENT"
                )
        if message.HasField("recipient") and message.recipient.mesh and self.peers is None:
            raise errors.AgentVaultError(
                "messages to agents of peer meshes need FEDERATION_ENCRYPTION_KEYS on the messaging service",
                "FEDERATED_MESSAGING_UNAVAILABLE",
                {},
                grpc.StatusCode.UNIMPLEMENTED,
            )
        status, approval_id, reason = "accepted", None, ""
        verdict = None
        instance = ""  # the recipient agent's instance it is addressed to ("": any)
        if original is not None and not message.HasField("recipient"):
            route = self.reply_route(original)
        else:
            if self.handoffs_away is not None and original is None and not message.recipient.mesh:
                # A session handed to an agent of a peer mesh: its conversation's messages go there.
                away = await self.handoffs_away.route_away(message.conversation_id, message.recipient.agent_id)
                if away is not None:
                    message.recipient.agent_id, message.recipient.mesh = away
                    message.recipient.ClearField("did")
                    body = model.content(message).SerializeToString()
            if message.recipient.mesh and self.peers is not None:
                # An agent of a peer mesh: handed over by the federation transport (federation.py).
                peer = await self.peers.require(message.recipient.mesh)
                remote = message.recipient.agent_id or message.recipient.did
                route = Route(peer_inbox(peer.name), message.recipient.agent_id, "", FEDERATION, peer.name, peer.name)
                agent = reg_pb.Agent(id=remote)
                target = agent_target(remote, "", (), peer.name)
            else:
                if self.sessions is not None and original is None and message.conversation_id:
                    # A conversation whose session was handed off: to its current owner (sessions.py).
                    owner, instance = await self.sessions.route(message.conversation_id, message.recipient.agent_id)
                    if owner != message.recipient.agent_id:
                        # Stored naming its actual recipient; the request hash stays the request's, for repeats.
                        message.recipient.agent_id = owner
                        body = model.content(message).SerializeToString()
                if not message.recipient.agent_id:
                    raise invalid("message.recipient.agent_id", "is required for an agent of this mesh")
                agent = await self._agent(message.recipient.agent_id, context, "message.recipient.agent_id")
                route = self._route(agent)
                target = agent_target(agent.id, agent.owner, agent.tags, self.settings.mesh)
            if original is not None and route.inbox != original.sender_inbox:
                raise invalid("message.recipient", "a reply goes to the sender of the message it answers")
            if original is None:
                verdict = await self.enforcer.decide(
                    who, "message.send", target, agent_id=agent.id, payload_size=message.ByteSize()
                )
                if verdict.outcome is Outcome.DENY and not verdict.transient:
                    metrics.SENT.labels(route.transport, "denied").inc()
                refuse_unless_decided(verdict, "this message", "MESSAGE_DENIED")
                if verdict.outcome is Outcome.ASK:
                    approver = agent.id
                    if route.transport == FEDERATION:
                        # Approvals name an agent of this mesh: for a message leaving it, the sending agent, whose
                        # owner answers (as for a handoff to a peer). A sender that is no agent cannot be asked for.
                        if principal.kind is not Kind.AGENT or not principal.agent_id:
                            raise PermissionDenied(
                                "this mesh's policy asks for an approval, which a message to a peer mesh from a "
                                "caller that is not an agent cannot wait for: " + "; ".join(verdict.decision.reasons),
                                "MESSAGE_DENIED",
                            )
                        approver = principal.agent_id
                    approval = await ask_once(
                        self.control,
                        verdict,
                        requested_by=principal.id,
                        action="message.send",
                        target=target.uid,
                        agent_id=approver,
                        purpose=_purpose(message) + (f" (to an agent of peer mesh {route.mesh})" if route.mesh else ""),
                    )
                    status, approval_id, reason = held_for(approval)
        conversation = message.conversation_id or (original.conversation_id if original else str(uuid.uuid4()))
        if original is not None and self.sessions is not None and route.transport == INBOX and route.agent_id:
            # A reply to the agent holding the conversation's session goes to the instance holding it.
            owner, held_by = await self.sessions.route(conversation, route.agent_id)
            instance = held_by if owner == route.agent_id else ""
        correlation = message.correlation_id or (original.correlation_id if original else str(message_id))
        expire_at = message.expire_time.ToDatetime(UTC) if message.HasField("expire_time") else None
        new = NewMessage(
            id=message_id,
            sender=who.uid,
            sender_kind=principal.kind.value,
            sender_id=principal.id,
            sender_agent=principal.agent_id if principal.kind is Kind.AGENT else "",
            sender_inbox=inbox_of(principal),
            inbox=route.inbox,
            recipient_agent=route.agent_id,
            recipient_owner=route.owner,
            recipient_mesh=route.mesh,
            transport=route.transport,
            endpoint=route.endpoint,
            conversation_id=conversation,
            correlation_id=correlation,
            in_reply_to=original.id if original else None,
            idempotency_key=key,
            request_hash=digest,
            body=body,
            status=status,
            approval_id=approval_id,
            expire_at=expire_at,
            status_reason=reason,
            traceparent=tracing.traceparent(),
            recipient_instance=instance,
        )
        try:
            row, duplicate = await self.store.insert(new)
        except IdempotencyConflict as exc:
            raise self._conflict(exc.existing) from None
        finally:
            if verdict is not None:
                await verdict.done()
        if duplicate:
            return self._repeat(row, who.uid, digest)
        if self.parts is not None:
            await self.parts.opened(message, row)
        await self.hub.publish([row])
        metrics.SENT.labels(row.transport, row.status).inc()
        metrics.SEND_SECONDS.observe(time.perf_counter() - started)
        return mpb.SendMessageResponse(message=row.proto())

    def reply_route(self, original: Row) -> Route:
        """Where a reply to `original` goes: the original sender's inbox (an agent's own transport when it has
        one is used by the worker that delivers agents' pushes; here, the inbox). A message from a peer mesh's agent
        is answered over the federation, to the peer of that name."""
        if original.sender_kind == "peer" and original.sender_inbox.startswith(peer_inbox("")):
            peer = original.sender_inbox.removeprefix(peer_inbox(""))
            return Route(original.sender_inbox, original.sender_agent, "", FEDERATION, peer, peer)
        return Route(original.sender_inbox, original.sender_agent, "", INBOX, "")

    def _repeat(self, row: Row, sender: str, digest: bytes) -> mpb.SendMessageResponse:
        if row.sender != sender or row.request_hash != digest:
            raise self._conflict(row if row.sender == sender else None)
        metrics.DUPLICATES.labels("send").inc()
        return mpb.SendMessageResponse(message=row.proto(), duplicate=True)

    @staticmethod
    def _conflict(existing: Row | None) -> AlreadyExists:
        if existing is None:
            return AlreadyExists("this message id is taken", "MESSAGE_ID_TAKEN")
        return AlreadyExists(
            f"this idempotency key (or id) was used for another message ({existing.id}); use a new key",
            "IDEMPOTENCY_KEY_REUSED",
            message_id=str(existing.id),
        )

    # Reading -----------------------------------------------------------------------------------------------

    async def _visible(self, principal: Principal, message_id: str, path: str = "id") -> Row:
        key = model.require_uuid(path, message_id)
        row = await self.store.get(key)
        if row is None or not self._may_see(principal, row):
            raise NotFound(f"message {message_id} not found", "MESSAGE_NOT_FOUND", id=message_id)
        return row

    async def GetMessage(self, request: mpb.GetMessageRequest, context: grpc.aio.ServicerContext) -> mpb.Message:
        principal = await self._principal(context)
        message = (await self._visible(principal, request.id)).proto()
        if self.parts is not None:
            await self.parts.annotate([message])  # parts.py: its stream's state
        return message

    async def ListMessages(
        self, request: mpb.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> mpb.ListMessagesResponse:
        principal = await self._principal(context)
        v = model.rules.Violations()
        if request.status and request.status not in model.STATUSES:
            v.add("status", f"must be one of {', '.join(model.STATUSES)}")
        for name in ("conversation_id", "correlation_id"):
            value = getattr(request, name)
            if len(value) > model.MAX_ID:
                v.add(name, f"must be at most {model.MAX_ID} characters")
        if request.agent_id:
            try:
                uuid.UUID(request.agent_id)
            except ValueError:
                v.add("agent_id", "must be a UUID")
        v.raise_if_any()
        size = pagination.page_size(request.page_size)
        query = f"m:{request.conversation_id}:{request.correlation_id}:{request.agent_id}:{request.status}"
        after = _position(request.page_token, query)
        viewer = self._viewer(principal)
        rows = await self.store.page(
            size + 1,
            after,
            viewer=viewer,
            conversation_id=request.conversation_id,
            correlation_id=request.correlation_id,
            agent_id=request.agent_id,
            status=request.status,
        )
        page, token = pagination.page_of(rows, size, query)
        messages = [r.proto() for r in page]
        if self.parts is not None:
            await self.parts.annotate(messages)  # parts.py: their streams' state
        return mpb.ListMessagesResponse(messages=messages, next_page_token=token)

    async def AwaitReply(
        self, request: mpb.AwaitReplyRequest, context: grpc.aio.ServicerContext
    ) -> mpb.AwaitReplyResponse:
        principal = await self._principal(context)
        if not 0 <= request.wait_seconds <= MAX_WAIT_SECONDS:
            raise invalid("wait_seconds", f"must be from 0 to {MAX_WAIT_SECONDS}")
        original = await self._visible(principal, request.id)
        if original.sender_inbox != inbox_of(principal):
            raise PermissionDenied("only the sender of a message waits for its reply", "NOT_THE_SENDER")
        remaining = context.time_remaining()
        wait = float(request.wait_seconds) if remaining is None else min(request.wait_seconds, remaining - 0.1)
        deadline = time.monotonic() + max(0.0, wait)
        inbox = original.sender_inbox
        with self.hub.waiting(inbox) as waiter:
            while True:
                waiter.clear()
                reply = await self.store.find_reply(inbox, original.id)
                if reply is not None:
                    await self.hub.publish([reply])
                    return mpb.AwaitReplyResponse(reply=reply.proto())
                left = deadline - time.monotonic()
                if left <= 0:
                    return mpb.AwaitReplyResponse()
                await waiter.wait(min(left, self.settings.poll_seconds))

    async def WatchMessages(
        self, request: mpb.WatchMessagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mpb.MessageEvent]:
        principal = await self._principal(context)
        if not (request.id or request.conversation_id or request.agent_id):
            raise invalid("id", "name a message, a conversation or an agent to watch")
        if len(request.conversation_id) > model.MAX_ID:
            raise invalid("conversation_id", f"must be at most {model.MAX_ID} characters")
        first: Row | None = None
        if request.id:
            first = await self._visible(principal, request.id)
        if request.agent_id:
            await self._inbox(principal, request.agent_id, context)  # the agent itself, its owner or an admin
        seen = self._viewer(principal)
        viewer = None if seen is None else frozenset(seen)
        if request.agent_id and viewer is not None:
            viewer = viewer | {agent_inbox(request.agent_id)}
        watcher = Watcher(
            ids=frozenset({str(first.id)}) if first else frozenset(),
            conversation_id=request.conversation_id,
            agent_id=request.agent_id,
            viewer=viewer,
        )
        self.hub.watch(watcher)
        try:
            if first is not None:
                now = await self.store.get(first.id) or first  # what it is now that the watch is registered
                yield mpb.MessageEvent(status=now.status, message=now.proto(with_content=False))
            while True:
                event = await watcher.queue.get()
                if event is None:
                    raise errors.ResourceExhausted("the watch fell too far behind; start it again", "WATCH_TOO_SLOW")
                row = await self.store.get(uuid.UUID(event.id))
                if row is not None:
                    yield mpb.MessageEvent(status=event.status, message=row.proto(with_content=False))
        finally:
            self.hub.unwatch(watcher)

    # Inboxes -----------------------------------------------------------------------------------------------

    async def ReceiveMessages(
        self, request: mpb.ReceiveMessagesRequest, context: grpc.aio.ServicerContext
    ) -> mpb.ReceiveMessagesResponse:
        principal = await self._principal(context)
        count = _seconds(request.max_messages, "max_messages", DEFAULT_RECEIVE, MAX_RECEIVE)
        visibility = _seconds(
            request.visibility_timeout_seconds, "visibility_timeout_seconds", DEFAULT_VISIBILITY, MAX_VISIBILITY
        )
        if not 0 <= request.wait_seconds <= MAX_LONG_POLL:
            raise invalid("wait_seconds", f"must be from 0 to {MAX_LONG_POLL}")
        instance = instance_label(request.instance, "instance")
        inbox = await self._inbox(principal, request.agent_id, context)
        deadline = time.monotonic() + request.wait_seconds
        with self.hub.waiting(inbox) as waiter:
            while True:
                waiter.clear()
                rows = await self.claim(inbox, count, visibility, instance)
                if rows or time.monotonic() >= deadline:
                    return mpb.ReceiveMessagesResponse(deliveries=[_delivery(r) for r in rows])
                await waiter.wait(min(deadline - time.monotonic(), self.settings.poll_seconds))

    async def claim(self, inbox: str, count: int, visibility: float, instance: str = "") -> list[Row]:
        """Messages addressed to no instance, or to `instance` (the receiver's label), are claimed; a receiver
        without a label leaves the ones addressed to an instance for it."""
        claimed = await self.store.claim_inbox(inbox, count, visibility, self.settings.max_attempts, instance)
        dead = [r for r in claimed if r.status == "dead_lettered"]
        rows = [r for r in claimed if r.status != "dead_lettered"]
        if dead:
            metrics.DEAD_LETTERED.labels(INBOX).inc(len(dead))
        await self.hub.publish(claimed)
        now = datetime.now(UTC)
        for row in rows:
            # Handed to the receiver: a span in the send's trace, linked to this receive call's.
            attributes = {"messaging.message.id": str(row.id), "messaging.transport": INBOX}
            tracing.mark("message.receive", tracing.CONSUMER, row.traceparent, attributes)
            if row.attempts == 1:
                metrics.DELIVERED.labels(INBOX).inc()
                metrics.DELIVERY_SECONDS.labels(INBOX).observe(max(0.0, (now - row.created_at).total_seconds()))
            else:
                metrics.DUPLICATES.labels("redelivery").inc()
        return rows

    async def AckMessage(self, request: mpb.AckMessageRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        principal = await self._principal(context)
        await self.ack(principal, request)
        return empty_pb2.Empty()

    async def ack(self, principal: Principal, request: mpb.AckMessageRequest) -> None:
        key = model.require_uuid("message_id", request.message_id)
        receipt = model.require_uuid("receipt", request.receipt)
        result, acked = await self.store.ack(key, receipt, _holder(principal))
        if result == "acked" and acked is not None:
            await self.hub.publish([acked])
            return
        if result == "already":
            metrics.DUPLICATES.labels("ack").inc()
            return
        if result == "missing":
            raise NotFound(f"message {request.message_id} not found in an inbox of yours", "MESSAGE_NOT_FOUND")
        raise _stale(request.message_id)

    async def AckMessages(
        self, request: mpb.AckMessagesRequest, context: grpc.aio.ServicerContext
    ) -> mpb.AckMessagesResponse:
        principal = await self._principal(context)
        return await acks.ack_many(self.store, self.hub, _holder(principal), request)

    async def NackMessage(self, request: mpb.NackMessageRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        principal = await self._principal(context)
        await self.nack(principal, request)
        return empty_pb2.Empty()

    async def nack(self, principal: Principal, request: mpb.NackMessageRequest) -> None:
        if not 0 <= request.delay_seconds <= MAX_VISIBILITY:
            raise invalid("delay_seconds", f"must be from 0 to {MAX_VISIBILITY}")
        v = model.rules.Violations()
        model.rules.check_text(v, "reason", request.reason, max_len=1024)
        v.raise_if_any()
        row = await self._receiver_row(principal, request.message_id, request.receipt)
        receipt = model.require_uuid("receipt", request.receipt)
        result, moved = await self.store.nack(
            row.id, receipt, request.delay_seconds, request.reason, request.dead_letter
        )
        if result != "nacked" or moved is None:
            raise _stale(request.message_id)
        if moved.status == "dead_lettered":
            metrics.DEAD_LETTERED.labels(moved.transport).inc()
            await self.hub.publish([moved])
        else:
            await self.hub.publish([moved], status="released")

    async def _receiver_row(self, principal: Principal, message_id: str, receipt: str) -> Row:
        key = model.require_uuid("message_id", message_id)
        model.require_uuid("receipt", receipt)
        row = await self.store.get(key)
        holder = _holder(principal)
        if row is None or (holder is not None and not holds(holder, row)):
            raise NotFound(f"message {message_id} not found in an inbox of yours", "MESSAGE_NOT_FOUND")
        return row

    async def StreamInbox(
        self, request: mpb.StreamInboxRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mpb.Delivery]:
        principal = await self._principal(context)
        async for delivery in await self.stream(principal, request, context):
            yield delivery

    async def stream(
        self, principal: Principal, request: mpb.StreamInboxRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mpb.Delivery]:
        """An inbox's deliveries as they arrive; at most `max_in_flight` delivered and not yet acknowledged (or
        past their visibility timeout) at a time: the receiver's pace sets the stream's. The request is checked
        here, before the first delivery is waited for, so that Converse can answer a bad subscribe."""
        limit = _seconds(request.max_in_flight, "max_in_flight", DEFAULT_IN_FLIGHT, MAX_IN_FLIGHT)
        visibility = _seconds(
            request.visibility_timeout_seconds, "visibility_timeout_seconds", DEFAULT_VISIBILITY, MAX_VISIBILITY
        )
        instance = instance_label(request.instance, "instance")
        inbox = await self._inbox(principal, request.agent_id, context)
        return self._deliveries(inbox, limit, visibility, instance)

    async def _deliveries(
        self, inbox: str, limit: int, visibility: int, instance: str = ""
    ) -> AsyncIterator[mpb.Delivery]:
        in_flight: dict[str, float] = {}  # message id -> when its visibility ends
        look = True  # whether the inbox may hold something this stream could take now
        with self.hub.waiting(inbox) as waiter:
            while True:
                waiter.clear()
                now = time.monotonic()
                for done in waiter.settled_ids():
                    in_flight.pop(done, None)
                for key in [k for k, until in in_flight.items() if until <= now]:
                    del in_flight[key]
                room = limit - len(in_flight)
                wanted = min(room, MAX_RECEIVE) if look else 0
                rows = await self.claim(inbox, wanted, visibility, instance) if wanted > 0 else []
                for row in rows:
                    in_flight[str(row.id)] = time.monotonic() + visibility
                    yield _delivery(row)
                if rows and len(rows) == wanted:
                    continue  # there may be more waiting
                woken = await waiter.wait(self.settings.poll_seconds)
                # Woken only by its own deliveries being settled (acks) while it had room: nothing new arrived, so no
                # claim (a streaming receiver's acks would otherwise each cost an empty one). A poll's timeout, an
                # arrival (or a nacked message visible again), or room freed after the stream was full look again.
                look = not woken or waiter.fresh or room <= 0

    async def Converse(
        self, request_iterator: AsyncIterator[mpb.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mpb.ConverseResponse]:
        principal = await self._principal(context)
        out: asyncio.Queue[mpb.ConverseResponse | None] = asyncio.Queue(CONVERSE_QUEUE)
        tasks: list[asyncio.Task[None]] = []

        async def deliver(deliveries: AsyncIterator[mpb.Delivery]) -> None:
            try:
                async for delivery in deliveries:
                    await out.put(mpb.ConverseResponse(delivery=delivery))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Deliveries stopped: said on the stream, which then ends (the caller subscribes again).
                await out.put(_converse_error("", exc))
                await out.put(None)

        async def handle(item: mpb.ConverseRequest) -> mpb.ConverseResponse:
            answer = mpb.ConverseResponse(request_id=item.request_id[:128])
            kind = item.WhichOneof("action")
            if kind == "send":
                check_scope(principal, MESSAGES_SEND)
                sent = await self.send(principal, item.send, context)
                # The caller has the content: the answer says what became of it (bounds the stream's queue).
                sent.message.ClearField("parts")
                answer.sent.CopyFrom(sent)
            elif kind == "ack":
                await self.ack(principal, item.ack)
                answer.done.SetInParent()
            elif kind == "nack":
                await self.nack(principal, item.nack)
                answer.done.SetInParent()
            elif kind == "subscribe":
                if tasks:
                    raise FailedPrecondition("this stream is already subscribed", "ALREADY_SUBSCRIBED")
                # Checked here, so that a bad subscribe is answered with its error rather than a dead task.
                deliveries = await self.stream(principal, item.subscribe, context)
                tasks.append(asyncio.create_task(deliver(deliveries)))
                answer.done.SetInParent()
            else:
                raise invalid("action", "must be one of subscribe, send, ack or nack")
            return answer

        async def read() -> None:
            try:
                async for item in request_iterator:
                    try:
                        answer = await handle(item)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        answer = _converse_error(item.request_id[:128], exc)
                    await out.put(answer)
            finally:
                # Not when cancelled: nobody reads the queue then, and a full one would never take the marker.
                me = asyncio.current_task()
                if me is None or not me.cancelling():
                    await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                response = await out.get()
                if response is None:
                    return
                yield response
        finally:
            for task in (reader, *tasks):
                task.cancel()
            for task in (reader, *tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # Dead letters ------------------------------------------------------------------------------------------

    async def _admin(self, context: grpc.aio.ServicerContext) -> Principal:
        return (await self.callers.require_scope(context.invocation_metadata(), ADMIN_SCOPE)).principal

    async def ListDeadLetters(
        self, request: mpb.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> mpb.ListDeadLettersResponse:
        await self._admin(context)
        if request.agent_id:
            model.require_uuid("agent_id", request.agent_id)
        size = pagination.page_size(request.page_size)
        query = f"dl:{request.agent_id}"
        after = _position(request.page_token, query)
        rows = await self.store.page(size + 1, after, viewer=None, agent_id=request.agent_id, status="dead_lettered")
        page, token = pagination.page_of(rows, size, query)
        return mpb.ListDeadLettersResponse(messages=[r.proto() for r in page], next_page_token=token)

    async def ReplayDeadLetter(
        self, request: mpb.ReplayDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> mpb.Message:
        principal = await self._admin(context)
        key = model.require_uuid("id", request.id)
        row = await self.store.replay(key)
        if row is None:
            raise NotFound(f"no dead letter {request.id}", "DEAD_LETTER_NOT_FOUND", id=request.id)
        await self.hub.publish([row])
        log.info("dead letter replayed", extra={"message_id": request.id, "by": principal.id})
        return row.proto()

    async def PurgeDeadLetters(
        self, request: mpb.PurgeDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> mpb.PurgeDeadLettersResponse:
        principal = await self._admin(context)
        if request.agent_id:
            model.require_uuid("agent_id", request.agent_id)
        before = request.before.ToDatetime(UTC) if request.HasField("before") else None
        purged = await self.store.purge(request.agent_id, before)
        log.info("dead letters purged", extra={"count": purged, "by": principal.id})
        return mpb.PurgeDeadLettersResponse(purged=purged)

    async def GetWebhookSecret(
        self, request: mpb.GetWebhookSecretRequest, context: grpc.aio.ServicerContext
    ) -> mpb.WebhookSecret:
        principal = await self._principal(context)
        agent = await self._agent(request.agent_id, context, "agent_id")
        if principal.kind is Kind.AGENT or not (principal.is_admin or principal.owns(agent.owner)):
            raise PermissionDenied("only the agent's owner or an admin may read its webhook secret", "NOT_THE_OWNER")
        key = self.settings.signing_secret(agent.id)
        log.info("webhook secret read", extra={"agent_id": agent.id, "by": principal.id})
        return mpb.WebhookSecret(agent_id=agent.id, secret="whsec_" + base64.b64encode(key).decode())

    async def GetMessageSchema(
        self, request: mpb.GetMessageSchemaRequest, context: grpc.aio.ServicerContext
    ) -> mpb.GetMessageSchemaResponse:
        answer = mpb.GetMessageSchemaResponse()
        json_format.ParseDict(message_schema(), answer.schema)
        return answer

    # Streamed parts (parts.py) -----------------------------------------------------------------------------

    def _streams(self) -> PartStreams:
        if self.parts is None:
            raise Unavailable("streamed parts are not served here", "STREAMS_UNAVAILABLE")
        return self.parts

    async def AppendParts(
        self, request: mpb.AppendPartsRequest, context: grpc.aio.ServicerContext
    ) -> mpb.AppendPartsResponse:
        principal = (await self.callers.require_scope(context.invocation_metadata(), MESSAGES_SEND)).principal
        return await self._streams().append(request, inbox_of(principal), lambda row: self._may_see(principal, row))

    async def StreamParts(
        self, request: mpb.StreamPartsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mpb.StreamPartsResponse]:
        principal = await self._principal(context)
        streams = self._streams()
        row = await streams.check_read(request, inbox_of(principal), lambda r: self._may_see(principal, r))
        async for item in streams.read(row, request.after_index):
            yield item


def _holder(principal: Principal) -> Holder | None:
    """Whose inbox messages the caller may take: its own inbox's, and (a person) those of agents it owns; None for
    an admin. An agent never holds its siblings' messages, though its credential names their owner."""
    if principal.is_admin and principal.kind is not Kind.AGENT:
        return None
    return inbox_of(principal), "" if principal.kind is Kind.AGENT else principal.id


def _holds(principal: Principal, row: Row) -> bool:
    holder = _holder(principal)
    return holder is None or holds(holder, row)


def _converse_error(request_id: str, exc: Exception) -> mpb.ConverseResponse:
    """A failed request on a Converse stream, answered like a failed call (store outages as UNAVAILABLE)."""
    known = exc if isinstance(exc, errors.AgentVaultError) else errors.from_store_error(exc)
    if known is None:
        log.error("a Converse request failed", exc_info=exc)
        known = errors.AgentVaultError("internal error", "INTERNAL")
    return mpb.ConverseResponse(
        request_id=request_id,
        error=mpb.ConverseError(code=known.code.value[0], message=known.message, reason=known.reason),
    )


def _purpose(message: mpb.Message) -> str:
    texts = [p.text for p in message.parts if p.WhichOneof("content") == "text"]
    summary = " ".join(texts)[:200] if texts else f"a message of {len(message.parts)} part(s)"
    return "send a message: " + "".join(ch for ch in summary if ch.isprintable())


def _delivery(row: Row) -> mpb.Delivery:
    return mpb.Delivery(message=row.proto(), receipt=str(row.receipt or ""), attempt=row.attempts)


def _stale(message_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"this receipt is not the current delivery of message {message_id} (its visibility timeout passed and it "
        "was delivered again, or it was already nacked)",
        "RECEIPT_STALE",
    )


def _position(token: str, query: str) -> tuple[datetime, str] | None:
    after: list[Any] | None = pagination.decode(token, query)
    if after is None:
        return None
    moment, key = pagination.time_and_id(after)
    try:
        uuid.UUID(key)
    except ValueError:
        raise InvalidArgument([errors.FieldViolation("page_token", "is not a valid page token")]) from None
    return moment, key
