"""Messages across meshes: the peer-facing service, the transport that hands messages to peers, their statuses."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import grpc
from google.protobuf import json_format

from agentvault.common import peers, signing, tracing
from agentvault.common.auth import bearer_token
from agentvault.common.errors import AlreadyExists, NotFound, PermissionDenied, Unavailable, invalid
from agentvault.common.peers import PeerTarget
from agentvault.common.policy.asking import ask_once, held_for
from agentvault.common.policy.engine import Outcome as Verdict
from agentvault.common.policy.request import Trust, agent_target, caller
from agentvault.common.principal import Principal
from agentvault.common.secretbox import SecretBox
from agentvault.common.signed_requests import SignedRequests
from agentvault.common.token_source import TokenSource
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.messaging.v1 import federated_messaging_pb2 as fpb
from agentvault.messaging.v1 import federated_messaging_pb2_grpc as fpb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc
from agentvault_messaging import metrics, model
from agentvault_messaging.events import Hub
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import IdempotencyConflict, NewMessage, Row, Store
from agentvault_messaging.transports.base import (
    DeliveryError,
    Outbound,
    Outcome,
    TransportContext,
    retry_after_seconds,
    retryable_status,
)

if TYPE_CHECKING:
    from agentvault_messaging.servicer import MessagingServicer
    from agentvault_messaging.session_federation import HandoffsAcrossMeshes

log = logging.getLogger(__name__)

FEDERATION = "federation"
MESSAGES_PATH = "/api/v1/federation/messages"
DELIVER_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/DeliverFederatedMessage"
STATUS_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/GetFederatedMessageStatus"
OFFER_HANDOFF_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/OfferFederatedHandoff"
HANDOFF_STATUS_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/GetFederatedHandoffStatus"
CONCLUDE_HANDOFF_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/ConcludeFederatedHandoff"
TOOL_METHOD = "/agentvault.messaging.v1.FederatedMessagingService/InvokeFederatedTool"
# The peer list is asked of the registry at most this often (a new or removed peer reaches sends within it).
PEER_SECONDS = 2.0
MISS_SECONDS = 0.5
# A peer's answer to Deliver or a status question: small JSON; more is refused.
MAX_ANSWER_BYTES = 64 * 1024
REGISTRY_TIMEOUT = 5.0
# Statuses of a message handed to a peer that may still change there (asked again, with backoff).
OPEN = ("held", "delivered")
STATUS_BATCH = 100
STATUS_CONCURRENCY = 16
MAX_STATUS_INTERVAL = 60.0


def peer_inbox(peer: str) -> str:
    """The `inbox` of a message handed to a peer, and the sender inbox of one a peer handed here."""
    return f"mesh:{peer}"


def local_status(peer_status: str) -> str:
    """A peer's status of a message as this mesh shows it: "accepted" there (stored, waiting for its recipient) is
    "delivered" here (handed over; "accepted" here means still to be handed over)."""
    return "delivered" if peer_status == "accepted" else peer_status


class PeerBook:
    """The active peers by name, from the registry's ResolvePeers (this service's own identity, federation:resolve),
    their keys decrypted with FEDERATION_ENCRYPTION_KEYS; reloaded at most every PEER_SECONDS."""

    def __init__(self, stub: fed_grpc.PeerServiceAsyncStub, identity: TokenSource, box: SecretBox | None) -> None:
        self.stub = stub
        self.identity = identity
        self.box = box
        self._peers: dict[str, PeerTarget] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> PeerTarget | None:
        # A name not known yet (a peer just added) is looked for again, at most every MISS_SECONDS.
        stale = PEER_SECONDS if name in self._peers else MISS_SECONDS
        if time.monotonic() - self._loaded_at >= stale:
            async with self._lock:
                if time.monotonic() - self._loaded_at >= stale:
                    await self._load()
        return self._peers.get(name)

    async def _load(self) -> None:
        if self.box is None:
            raise Unavailable(
                "messages to peer meshes need FEDERATION_ENCRYPTION_KEYS on the messaging service", "FEDERATION_OFF"
            )
        try:
            token = await self.identity.token()
            loaded = await peers.load_peers(self.stub, token, self.box, timeout=REGISTRY_TIMEOUT)
        except Exception as exc:
            # A stale list beats none while the registry blips; asked again soon.
            log.warning("cannot load federation peers: %s", type(exc).__name__)
            if not self._peers:
                raise Unavailable("the registry cannot list the peers now", "REGISTRY_UNAVAILABLE") from None
            self._loaded_at = time.monotonic() - PEER_SECONDS + 0.5
            return
        self._peers = {p.name: p for p in loaded}
        self._loaded_at = time.monotonic()

    async def require(self, name: str) -> PeerTarget:
        peer = await self.get(name)
        if peer is None:
            raise NotFound(f"no active peer mesh named {name!r}", "PEER_NOT_FOUND", mesh=name[:255])
        return peer


class PeerCallError(Exception):
    def __init__(self, status: int, reason: str, text: str, retry_after: str | None) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.text = text
        self.retry_after = retry_after


class PeerClient:
    """Signed HTTP calls to a peer's edge (its registry URL), as discovery's REST peers: the HMAC covers the
    method, the path as sent, the body and a nonce, keyed with the token the peer issued to this mesh."""

    def __init__(self, session: aiohttp.ClientSession, mesh: str) -> None:
        self.session = session
        self.mesh = mesh

    def signed(self, peer: PeerTarget, method: str, path: str, body: str) -> tuple[str, dict[str, str]]:
        """The URL and the signed headers of one request to the peer's edge (also tools/federated.py's)."""
        base = peer.registry_url.rstrip("/")
        full_path = _path_of(base) + path
        nonce = signing.new_nonce()
        headers = {
            "Accept": "application/json",
            "Authorization": f"Bearer {peer.api_key}",
            signing.REGISTRY_HEADER: self.mesh,
            signing.NONCE_HEADER: nonce,
            signing.SIGNATURE_HEADER: signing.sign(method, full_path, body, peer.api_key, nonce=nonce),
        }
        if body:
            headers["Content-Type"] = "application/json"
        return base + path, headers

    async def call(self, peer: PeerTarget, method: str, path: str, body: str, deadline: float) -> dict[str, Any]:
        url, headers = self.signed(peer, method, path, body)
        async with self.session.request(
            method,
            url,
            data=body.encode() if body else None,
            # The trace context travels outside the signature, as discovery's calls to a peer's edge.
            headers=tracing.inject(headers),
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=deadline),
        ) as response:
            raw = await response.content.read(MAX_ANSWER_BYTES + 1)
            document = _json(raw) if len(raw) <= MAX_ANSWER_BYTES else None
            if 200 <= response.status < 300:
                if not isinstance(document, dict):
                    raise PeerCallError(502, "", "the peer's answer is not a JSON object", None)
                return document
            reason, text = _error_of(document)
            raise PeerCallError(response.status, reason, text, response.headers.get("Retry-After"))


def _path_of(base: str) -> str:
    return urlsplit(base).path.rstrip("/")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _error_of(document: Any) -> tuple[str, str]:
    """The reason and message of the peer edge's JSON error, bounded (shown to the sender)."""
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return "", ""
    reason = ""
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("ErrorInfo"):
            reason = str(detail.get("reason", ""))[:64]
    return reason, str(error.get("message", ""))[:300]


def _status_of(document: dict[str, Any]) -> fpb.FederatedMessageStatus:
    answer = fpb.FederatedMessageStatus()
    try:
        json_format.ParseDict(document, answer, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError):
        raise PeerCallError(502, "", "the peer's answer is not a message status", None) from None
    if answer.status not in model.STATUSES:
        raise PeerCallError(502, "", "the peer's answer names no known status", None)
    return answer


class FederationTransport:
    """Hands a message to the peer mesh its recipient is registered in (DeliverFederatedMessage through the peer's
    edge); the peer's answer is the message's status here. Retries, backoff, the circuit per peer and dead letters
    are the delivery worker's, as for any transport. Never chosen for an agent's endpoints (no protocols)."""

    name: ClassVar[str] = FEDERATION
    protocols: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 1000
    # The recipient is no agent of this mesh: the worker prepares no agent credentials for it.
    uses_agent_auth: ClassVar[bool] = False

    def __init__(self, book: PeerBook, client: PeerClient) -> None:
        self.book = book
        self.client = client

    async def deliver(self, item: Outbound, context: TransportContext) -> Outcome:
        try:
            peer = await self.book.get(item.endpoint)
        except Unavailable as exc:
            raise DeliveryError(exc.message) from None
        if peer is None or not peer.api_key:
            raise DeliveryError(f"no active peer mesh named {item.endpoint!r} with a credential", permanent=True)
        message = model.content(item.message)
        message.id = item.message.id
        if message.in_reply_to:
            message.ClearField("recipient")  # a reply goes to the sender of the message it answers, in the peer
        elif message.HasField("recipient"):
            message.recipient.ClearField("mesh")  # this mesh's name for the peer means nothing there
        sender = mpb.Party(agent_id=item.message.sender.agent_id)
        request = fpb.DeliverFederatedMessageRequest(message=message, sender=sender)
        body = json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None)
        try:
            # A CLIENT span whose context the peer's edge continues (when spans are recorded).
            with tracing.span("POST " + MESSAGES_PATH, tracing.CLIENT, attributes={"peer.name": peer.name}):
                document = await self.client.call(peer, "POST", MESSAGES_PATH, body, item.deadline)
        except PeerCallError as exc:
            raise _delivery_error(peer.name, exc) from None
        except TimeoutError:
            raise DeliveryError(f"peer {peer.name} gave no answer within {item.deadline:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"cannot reach peer {peer.name}: {type(exc).__name__}") from None
        try:
            answer = _status_of(document)
        except PeerCallError as exc:
            raise DeliveryError(f"peer {peer.name}: {exc.text}") from None
        annotations = {"federation.peer": peer.name, "federation.status": answer.status}
        if answer.approval_id:
            annotations["federation.approval_id"] = answer.approval_id
        why = answer.status_reason or f"handed to peer {peer.name}"
        return Outcome(local_status(answer.status), reason=f"{peer.name}: {why}", annotations=annotations)

    async def status(self, peer_name: str, message_id: uuid.UUID, deadline: float) -> fpb.FederatedMessageStatus:
        peer = await self.book.get(peer_name)
        if peer is None or not peer.api_key:
            raise PeerCallError(404, "PEER_NOT_FOUND", f"no active peer mesh named {peer_name!r}", None)
        document = await self.client.call(peer, "GET", f"{MESSAGES_PATH}/{message_id}", "", deadline)
        return _status_of(document)

    async def close(self) -> None:
        """Nothing to release: the mesh owns the session."""


def _delivery_error(peer: str, exc: PeerCallError) -> DeliveryError:
    """A peer's refusal of a delivery: throttled or failing peers are retried, other refusals are final."""
    text = f"peer {peer} answered HTTP {exc.status}" + (f" {exc.reason}" if exc.reason else "")
    if exc.text:
        text += f": {exc.text}"
    if retryable_status(exc.status):
        hint = retry_after_seconds(exc.retry_after) if exc.status in (429, 503) else None
        return DeliveryError(text, retry_after=hint)
    return DeliveryError(text, permanent=True)


class StatusFollower:
    """Asks peers what became of the messages handed to them that may still change there (held, delivered), each
    with a growing interval (a quarter of its age, from MESSAGING_POLL_SECONDS up to a minute), until it is final;
    any number of replicas share the work (SKIP LOCKED). Works with one-way peering: the origin asks."""

    def __init__(self, settings: MessagingSettings, store: Store, hub: Hub, transport: FederationTransport) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.transport = transport
        self._room = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def run(self) -> None:
        while True:
            try:
                due = await self._due()
                await asyncio.gather(*(self._ask(*row) for row in due))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("federated status check failed: %s", exc)
            await asyncio.sleep(self.settings.poll_seconds)

    async def _due(self) -> list[tuple[uuid.UUID, str, str]]:
        records = await self.store.pool.fetch(
            """
            WITH picked AS (
                SELECT id FROM messages
                WHERE transport = 'federation' AND status = ANY($1::text[]) AND receipt IS NULL
                  AND annotations ? 'federation.status' AND federation_check_at <= now()
                ORDER BY federation_check_at LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            UPDATE messages m SET federation_check_at = now() + make_interval(secs => least($4::float8,
                greatest($3::float8, extract(epoch FROM now() - m.created_at)::float8 / 4)))
            FROM picked WHERE m.id = picked.id
            RETURNING m.id, m.endpoint, m.status
            """,
            list(OPEN),
            STATUS_BATCH,
            self.settings.poll_seconds,
            MAX_STATUS_INTERVAL,
        )
        return [(r["id"], r["endpoint"], r["status"]) for r in records]

    async def _ask(self, message_id: uuid.UUID, peer: str, status: str) -> None:
        async with self._room:
            try:
                answer = await self.transport.status(peer, message_id, self.settings.delivery_timeout)
            except (PeerCallError, aiohttp.ClientError, OSError, TimeoutError, Unavailable) as exc:
                log.debug("status of %s at peer %s unknown now: %s", message_id, peer, type(exc).__name__)
                return
        changed = local_status(answer.status)
        reason = f"{peer}: {answer.status_reason}" if answer.status_reason else f"{peer}: {answer.status}"
        if changed == status:
            return
        # A status the peer reports replaces the one this mesh had, once (the row must still be as it was read).
        # A held row forgets this mesh's own (answered) approval, so that approval never releases it again.
        updated = await self.store.pool.fetchval(
            """UPDATE messages SET status = $3::text, status_reason = $4, updated_at = now(),
                    approval_id = CASE WHEN $3::text = 'held' THEN NULL ELSE approval_id END,
                    annotations = annotations || jsonb_build_object('federation.status', $5::text)
                WHERE id = $1 AND status = $2 AND transport = 'federation' RETURNING id""",
            message_id,
            status,
            changed,
            reason[:1024],
            answer.status,
        )
        if updated is not None:
            row = await self.store.get(message_id)
            if row is not None:
                await self.hub.publish([row])


class FederatedMessaging(fpb_grpc.FederatedMessagingServiceServicer):
    """The peer-facing service. A caller must be a peer (the federation credential this mesh issued to it, resolved
    by the registry) whose request is signed with it (fresh, not replayed, within its rate: SignedRequests with its
    own Redis keys). Everything it sends is checked like any message; this mesh's policy decides as for a local
    send, the peer being the caller."""

    def __init__(
        self,
        messaging: MessagingServicer,
        requests: SignedRequests,
        registry: reg_grpc.RegistryServiceAsyncStub,
    ) -> None:
        self.messaging = messaging
        self.requests = requests
        self.registry = registry  # this service's own identity (agents:read)
        # The peer side of tools (tools/federated.py's PeerToolServer), set by the tools' wiring.
        self.tools: Any = None

    async def _peer(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> Principal:
        metadata = context.invocation_metadata()
        principal = (await self.messaging.callers.require(metadata, peers=True)).principal
        if not principal.is_peer:
            raise PermissionDenied(
                "only a peer mesh, with the federation credential this mesh issued to it, may call this",
                "PEER_REQUIRED",
            )
        await self.requests.admit(metadata, method, request, bearer_token(metadata) or "", principal.id)
        return principal

    async def DeliverFederatedMessage(
        self, request: fpb.DeliverFederatedMessageRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederatedMessageStatus:
        principal = await self._peer(context, DELIVER_METHOD, request)
        settings = self.messaging.settings
        store = self.messaging.store
        if not request.HasField("message"):
            raise invalid("message", "is required")
        message = request.message
        model.check(message, settings.max_message_bytes)
        v = model.rules.Violations()
        if not message.id:
            v.add("message.id", "is required: the id the message has in the sending mesh")
        if message.HasField("recipient") and message.recipient.mesh:
            v.add("message.recipient.mesh", "must be empty: the recipient is an agent of this mesh")
        if request.sender.agent_id:
            try:
                uuid.UUID(request.sender.agent_id)
            except ValueError:
                v.add("sender.agent_id", "must be a UUID")
        v.raise_if_any()
        # The peer is the caller; its mesh is its name here.
        who = caller(principal, Trust.UNTRUSTED, principal.name)
        message_id = uuid.UUID(message.id)
        digest = model.request_hash(message)
        repeated = await store.find_repeat(who.uid, message_id, None)
        if repeated is not None:
            return _answer(_same(repeated, who.uid, digest), duplicate=True)
        status, approval_id, reason = "accepted", None, ""
        original: Row | None = None
        owner = ""
        verdict = None
        if message.in_reply_to:
            # A reply to a message this mesh handed to this peer: to that message's sender, correlated.
            original = await store.get(uuid.UUID(message.in_reply_to))
            if original is None or original.transport != FEDERATION or original.recipient_mesh != principal.name:
                raise NotFound(f"message {message.in_reply_to} not found", "MESSAGE_NOT_FOUND")
            route = self.messaging.reply_route(original)
            recipient_agent, inbox, transport, endpoint = route.agent_id, route.inbox, route.transport, route.endpoint
            body = model.content(message)
            body.ClearField("recipient")
        else:
            agent = await self._recipient(message.recipient)
            route = self.messaging._route(agent)
            recipient_agent, inbox, transport, endpoint = agent.id, route.inbox, route.transport, route.endpoint
            owner = agent.owner
            target = agent_target(agent.id, agent.owner, agent.tags, settings.mesh)
            verdict = await self.messaging.enforcer.decide(
                who, "message.send", target, agent_id=agent.id, payload_size=message.ByteSize()
            )
            try:
                if verdict.transient:
                    raise Unavailable("the policy engine cannot decide now", "POLICY_UNAVAILABLE")
                if verdict.outcome is Verdict.DENY:
                    metrics.SENT.labels(FEDERATION, "denied").inc()
                    # Answered, not raised: the message reached this mesh, whose policy refused it.
                    return fpb.FederatedMessageStatus(
                        id=message.id,
                        status="refused",
                        status_reason="the policy engine refused this message: " + "; ".join(verdict.decision.reasons),
                    )
                if verdict.outcome is Verdict.ASK:
                    approval = await ask_once(
                        self.messaging.control,
                        verdict,
                        requested_by=principal.id,
                        action="message.send",
                        target=target.uid,
                        agent_id=agent.id,
                        purpose=f"a message from peer {principal.name}",
                    )
                    status, approval_id, reason = held_for(approval)
            except BaseException:
                await verdict.done()
                raise
            body = model.content(message)
            body.recipient.CopyFrom(mpb.Party(agent_id=agent.id, did=agent.did))
        expire_at = message.expire_time.ToDatetime(UTC) if message.HasField("expire_time") else None
        new = NewMessage(
            id=message_id,
            sender=who.uid,
            sender_kind="peer",
            sender_id=principal.id,
            sender_agent=request.sender.agent_id,
            sender_inbox=peer_inbox(principal.name),
            inbox=inbox,
            recipient_agent=recipient_agent,
            recipient_owner=owner,
            recipient_mesh="",
            transport=transport,
            endpoint=endpoint,
            conversation_id=message.conversation_id or (original.conversation_id if original else str(message_id)),
            correlation_id=message.correlation_id or (original.correlation_id if original else str(message_id)),
            in_reply_to=original.id if original else None,
            idempotency_key=None,
            request_hash=digest,
            body=body.SerializeToString(),
            status=status,
            approval_id=approval_id,
            expire_at=expire_at,
            status_reason=reason,
            # The peer's trace (its edge's call, continued here): this mesh's delivery of it joins that trace.
            traceparent=tracing.traceparent(),
        )
        try:
            row, duplicate = await store.insert(new)
        except IdempotencyConflict:
            raise _taken() from None
        finally:
            if verdict is not None:
                await verdict.done()
        if duplicate:
            return _answer(_same(row, who.uid, digest), duplicate=True)
        await self.messaging.hub.publish([row])
        metrics.SENT.labels(FEDERATION, row.status).inc()
        return _answer(row)

    async def _recipient(self, party: mpb.Party) -> reg_pb.Agent:
        """The agent of this mesh a peer's message is for: shared with peers (federated), by its id (and its DID,
        when given, must match). Anything else is not found, as for a search of this mesh."""
        if not party.agent_id:
            raise invalid("message.recipient.agent_id", "is required (the agent's id in this mesh)")
        missing = NotFound(f"agent {party.agent_id} not found", "AGENT_NOT_FOUND", id=party.agent_id)
        try:
            agent: reg_pb.Agent = await self.registry.GetAgent(
                reg_pb.GetAgentRequest(id=party.agent_id), timeout=REGISTRY_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise missing from None
            log.warning("registry GetAgent failed: %s", exc.code().name)
            raise Unavailable("the registry cannot be asked now", "REGISTRY_UNAVAILABLE") from None
        if agent.sharing != reg_pb.SHARING_FEDERATED or (party.did and party.did != agent.did):
            raise missing
        return agent

    async def GetFederatedMessageStatus(
        self, request: fpb.GetFederatedMessageStatusRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederatedMessageStatus:
        principal = await self._peer(context, STATUS_METHOD, request)
        key = model.require_uuid("id", request.id)
        row = await self.messaging.store.get(key)
        who = caller(principal, Trust.UNTRUSTED, principal.name)
        if row is None or row.sender != who.uid:
            raise NotFound(f"message {request.id} not found", "MESSAGE_NOT_FOUND", id=request.id)
        return _answer(row)

    async def InvokeFederatedTool(
        self, request: fpb.InvokeFederatedToolRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.InvokeToolEvent]:
        principal = await self._peer(context, TOOL_METHOD, request)
        if self.tools is None:
            raise Unavailable("this mesh serves no tools to peer meshes", "FEDERATION_OFF")
        async for event in self.tools.invoke(principal, request):
            yield event

    # Sessions handed off across meshes (session_federation.py): the peer offers, asks, concludes.
    handoffs: HandoffsAcrossMeshes | None = None

    def _handoffs(self) -> HandoffsAcrossMeshes:
        if self.handoffs is None:
            raise Unavailable("handoffs from peer meshes are not served here", "FEDERATION_OFF")
        return self.handoffs

    async def OfferFederatedHandoff(
        self, request: fpb.OfferFederatedHandoffRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederatedHandoffStatus:
        principal = await self._peer(context, OFFER_HANDOFF_METHOD, request)
        return await self._handoffs().offered(principal, request)

    async def GetFederatedHandoffStatus(
        self, request: fpb.GetFederatedHandoffStatusRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederatedHandoffStatus:
        principal = await self._peer(context, HANDOFF_STATUS_METHOD, request)
        return await self._handoffs().peer_status(principal, request.id)

    async def ConcludeFederatedHandoff(
        self, request: fpb.ConcludeFederatedHandoffRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederatedHandoffStatus:
        principal = await self._peer(context, CONCLUDE_HANDOFF_METHOD, request)
        return await self._handoffs().conclude(principal, request)


def _same(row: Row, sender: str, digest: bytes) -> Row:
    """The stored message when it is the one the peer sends again; a conflict when its id is taken."""
    if row.sender != sender or row.request_hash != digest:
        raise _taken()
    return row


def _taken() -> AlreadyExists:
    return AlreadyExists(
        "this message id is taken by another message (from another sender, or with other content)",
        "MESSAGE_ID_TAKEN",
    )


def _answer(row: Row, *, duplicate: bool = False) -> fpb.FederatedMessageStatus:
    return fpb.FederatedMessageStatus(
        id=str(row.id),
        status=row.status,
        status_reason=row.status_reason,
        approval_id=str(row.approval_id) if row.approval_id else "",
        duplicate=duplicate,
    )
