"""Push delivery to external agents (retries, backoff with jitter, a circuit per endpoint, dead letters), held
messages released by their approvals, and the sweeper (expiry, retention, queue depth)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
import grpc

from agentvault.common import tracing
from agentvault.common.agent_auth import NO_AUTH, AgentConnector, PreparedAuth, resolve_agent_auth
from agentvault.common.lru import Lru
from agentvault.common.policy.asking import answer_of
from agentvault.common.policy.enforcer import ControlPlane
from agentvault.common.policy.request import uid
from agentvault.common.secretbox import SecretBox
from agentvault.common.token_source import TokenSource
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc
from agentvault_messaging import metrics, model
from agentvault_messaging.events import Hub
from agentvault_messaging.parts import PartStreams
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import INBOX, NewMessage, Row, Store
from agentvault_messaging.transports.base import DeliveryError, Outbound, Outcome, Transport, TransportContext

log = logging.getLogger(__name__)

CLAIM_BATCH = 100
AGENT_SECONDS = 5.0
MAX_BREAKERS = 100_000
# Reply ids are derived from the original's id and the reply's place, so a delivery made twice (at least once)
# stores its replies once.
REPLY_NAMESPACE = uuid.UUID("6f1d3c1e-2b53-4f43-9d59-3a1f6a8f0c11")


class Breaker:
    """A circuit per endpoint, in this replica: after `failures` consecutive failures it opens for `seconds`; then
    one attempt goes through, and one more failure opens it again. Bounded: endpoints are registered by anyone."""

    def __init__(self, failures: int, seconds: float) -> None:
        self.failures = failures
        self.seconds = seconds
        self._state: Lru[str, tuple[int, float]] = Lru(MAX_BREAKERS)
        self._opened: dict[str, float] = {}  # open circuits, for the gauge

    def open_for(self, endpoint: str) -> float:
        state = self._state.get(endpoint)
        if state is None:
            return 0.0
        return max(0.0, state[1] - time.monotonic())

    def success(self, endpoint: str) -> None:
        self._state.pop(endpoint)
        self._opened.pop(endpoint, None)
        self._gauge()

    def failure(self, endpoint: str) -> None:
        count = (self._state.get(endpoint) or (0, 0.0))[0] + 1
        until = time.monotonic() + self.seconds if count >= self.failures else 0.0
        self._state.put(endpoint, (count, until))
        if until:
            self._opened[endpoint] = until
            while len(self._opened) > MAX_BREAKERS:
                self._opened.pop(next(iter(self._opened)))
        self._gauge()

    def _gauge(self) -> None:
        now = time.monotonic()
        for endpoint in [e for e, until in self._opened.items() if until <= now]:
            del self._opened[endpoint]
        metrics.CIRCUITS_OPEN.set(len(self._opened))


def backoff(attempt: int, base: float, ceiling: float, hint: float | None = None) -> float:
    """Exponential backoff with jitter (half fixed, half random, so retries spread but still wait): attempt 1
    waits about `base`, each next one twice as long, up to `ceiling`. An agent's own hint (Retry-After) is honoured
    when it asks for longer, within the ceiling."""
    delay = min(ceiling, base * (2 ** max(0, attempt - 1)))
    delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not a secret
    if hint is not None:
        delay = max(delay, min(hint, ceiling))
    return delay


class AgentDirectory:
    """Recipient agents as the service sees them (its own token): the registration's version, for the prepared
    credentials' cache, and the credentials themselves."""

    def __init__(
        self, registry: reg_grpc.RegistryServiceAsyncStub, connector: AgentConnector, box: SecretBox | None
    ) -> None:
        self.registry = registry
        self.connector = connector
        self.box = box
        self._versions: Lru[str, tuple[str, float]] = Lru(10_000)

    async def auth(self, agent_id: str, version: str = "") -> PreparedAuth:
        """`version`: the registration's, when the caller has just read it (no registry read here then)."""
        now = time.monotonic()
        known = self._versions.get(agent_id)
        if version:
            self._versions.put(agent_id, (version, now + AGENT_SECONDS))
        elif known is None or known[1] <= now:
            agent = await self.registry.GetAgent(reg_pb.GetAgentRequest(id=agent_id), timeout=AGENT_SECONDS)
            version = f"{agent.update_time.seconds}.{agent.update_time.nanos}"
            self._versions.put(agent_id, (version, now + AGENT_SECONDS))
        else:
            version = known[0]

        async def resolve() -> tuple[object, str]:
            return await resolve_agent_auth(self.registry, agent_id, self.box, timeout=AGENT_SECONDS)

        return await self.connector.for_agent(agent_id, version, resolve)  # type: ignore[arg-type]


class DeliveryWorker:
    """Claims due push messages (any number of replicas: SKIP LOCKED, and a lease per attempt) and delivers them,
    at most `delivery_concurrency` at a time in this replica."""

    def __init__(
        self,
        settings: MessagingSettings,
        store: Store,
        hub: Hub,
        transports: dict[str, Transport],
        agents: AgentDirectory,
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.transports = transports
        self.agents = agents
        self.session = session
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_seconds)
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()

    async def run(self) -> None:
        names = list(self.transports)
        try:
            while True:
                self.hub.push_wakeup.clear()
                free = self.settings.delivery_concurrency - len(self._tasks)
                rows: list[Row] = []
                if free > 0:
                    try:
                        rows = await self.store.claim_due(
                            min(free, CLAIM_BATCH), self.settings.delivery_timeout + 5, names
                        )
                    except Exception as exc:
                        log.warning("cannot claim messages to deliver: %s", exc)
                for row in rows:
                    task = asyncio.create_task(self.deliver(row))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
                if rows and len(rows) == min(free, CLAIM_BATCH):
                    continue
                self._room.clear()
                waits = [self.hub.push_wakeup.wait()] if free > 0 else [self._room.wait()]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*waits), self.settings.poll_seconds)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.set()

    async def deliver(self, row: Row) -> None:
        try:
            # In the send's trace (its stored traceparent), however much later and on whichever replica.
            parent = {"traceparent": row.traceparent} if row.traceparent else None
            attributes = {"messaging.message.id": str(row.id), "messaging.transport": row.transport}
            with tracing.span("message.deliver", tracing.CONSUMER, parent, attributes):
                await self._deliver(row)
        except asyncio.CancelledError:
            raise
        except Exception:  # the lease ends and the message is due again: nothing is lost
            log.exception("delivery of %s failed unexpectedly", row.id)

    async def _deliver(self, row: Row) -> None:
        transport = self.transports[row.transport]
        now = datetime.now(UTC)
        if row.expire_at is not None and row.expire_at <= now:
            await self._finish(row, "expired", "expired before it was delivered")
            metrics.EXPIRED.inc()
            return
        closed_in = self.breaker.open_for(row.endpoint)
        if closed_in > 0:
            moved = await self.store.postpone(row, closed_in, "the endpoint's circuit is open; retrying when it closes")
            if moved is not None:
                await self.hub.publish([moved])
            return
        try:
            # A transport whose recipient is no agent of this mesh (federation) needs no agent credentials.
            uses_auth = getattr(transport, "uses_agent_auth", True)
            auth = await self.agents.auth(row.recipient_agent) if uses_auth else NO_AUTH
            message = row.proto()
            # The sender's principal id names a person or client of this mesh: not the external agent's business.
            message.sender.ClearField("principal_id")
            outbound = Outbound(
                message, row.recipient_agent, row.endpoint, row.attempts, self.settings.delivery_timeout
            )
            context = TransportContext(
                self.session,
                auth,
                self.settings.signing_secret(row.recipient_agent),
                block_private=self.settings.block_private_agent_urls,
            )
            outcome = await asyncio.wait_for(transport.deliver(outbound, context), self.settings.delivery_timeout + 1)
        except DeliveryError as exc:
            await self._failed(row, exc)
            return
        except TimeoutError:
            await self._failed(row, DeliveryError(f"no answer within {self.settings.delivery_timeout:g} s"))
            return
        except grpc.aio.AioRpcError as exc:
            await self._failed(row, DeliveryError(f"the registry could not describe the agent ({exc.code().name})"))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("transport %s raised %s delivering %s", row.transport, type(exc).__name__, row.id)
            await self._failed(row, DeliveryError(f"the {row.transport} transport failed ({type(exc).__name__})"))
            return
        self.breaker.success(row.endpoint)
        metrics.ATTEMPTS.labels(row.transport, "ok").inc()
        settled = await self._finish(row, outcome.status, outcome.reason, dict(outcome.annotations))
        if settled is not None:
            metrics.DELIVERED.labels(row.transport).inc()
            metrics.DELIVERY_SECONDS.labels(row.transport).observe(max(0.0, (now - row.created_at).total_seconds()))
            await self.store_replies(row, outcome)

    async def _finish(
        self, row: Row, status: str, reason: str, annotations: dict[str, str] | None = None
    ) -> Row | None:
        settled = await self.store.settle(
            row, status, reason, {k[:64]: v[:256] for k, v in list((annotations or {}).items())[:8]}
        )
        if settled is not None:
            await self.hub.publish([settled])
        return settled

    async def _failed(self, row: Row, exc: DeliveryError) -> None:
        self.breaker.failure(row.endpoint)
        metrics.ATTEMPTS.labels(row.transport, "permanent" if exc.permanent else "retry").inc()
        age = (datetime.now(UTC) - row.created_at).total_seconds()
        if exc.permanent or row.attempts >= self.settings.max_attempts or age >= self.settings.max_age_seconds:
            why = (
                "refused by the agent"
                if exc.permanent
                else f"gave up after {row.attempts} attempts"
                if row.attempts >= self.settings.max_attempts
                else f"undelivered after {age:.0f} s"
            )
            if await self._finish(row, "dead_lettered", f"{why}: {exc.reason}") is not None:
                metrics.DEAD_LETTERED.labels(row.transport).inc()
            return
        delay = backoff(
            row.attempts, self.settings.retry_base_seconds, self.settings.retry_max_seconds, exc.retry_after
        )
        moved = await self.store.retry_later(row, delay, f"attempt {row.attempts} failed: {exc.reason}")
        if moved is not None:
            await self.hub.publish([moved])

    async def store_replies(self, row: Row, outcome: Outcome) -> None:
        """The agent's answers, as messages from it to the sender, correlated with the original. They are
        untrusted input like any send: checked and bounded, and one that fails is dropped (and logged)."""
        stored: list[Row] = []
        for i, reply in enumerate(outcome.replies[: model.MAX_PARTS]):
            reply = model.content(reply)
            reply.ClearField("recipient")
            reply.in_reply_to = str(row.id)
            reply.id = ""
            try:
                model.check(reply, self.settings.max_message_bytes, path="reply")
            except Exception as exc:
                log.warning("dropping a malformed reply from agent %s: %s", row.recipient_agent, exc)
                continue
            new = NewMessage(
                id=uuid.uuid5(REPLY_NAMESPACE, f"{row.id}/{i}"),
                sender=uid("Caller::Agent", row.recipient_agent),
                sender_kind="agent",
                sender_id=row.recipient_agent,
                sender_agent=row.recipient_agent,
                sender_inbox=f"agent:{row.recipient_agent}",
                inbox=row.sender_inbox,
                recipient_agent=row.sender_agent,
                recipient_owner="",
                recipient_mesh="",
                transport=INBOX,
                endpoint="",
                conversation_id=reply.conversation_id or row.conversation_id,
                correlation_id=row.correlation_id,
                in_reply_to=row.id,
                idempotency_key=None,
                request_hash=model.request_hash(reply),
                body=reply.SerializeToString(),
                status="accepted",
                approval_id=None,
                expire_at=None,
            )
            saved, duplicate = await self.store.insert(new)
            if not duplicate:
                stored.append(saved)
        await self.hub.publish(stored)


class HeldHandoffs(Protocol):
    """What ApprovalFollower needs of held session handoffs (sessions.HandoffApprovals)."""

    async def held(self, limit: int) -> list[uuid.UUID]: ...

    async def apply(self, approval: ppb.Approval) -> None: ...

    async def release(self, approval_id: uuid.UUID, approved: bool, reason: str) -> None: ...


class ApprovalFollower:
    """Releases held messages when their approvals are answered: follows WatchApprovals (the service sees every
    approval with policies:enforce) and, at each (re)connection, asks for the ones it may have missed."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        tokens: TokenSource,
        store: Store,
        hub: Hub,
        control: ControlPlane,
        handoffs: HeldHandoffs | None = None,
    ) -> None:
        self.stub = ppb_grpc.PolicyServiceStub(channel)
        self.tokens = tokens
        self.store = store
        self.hub = hub
        self.control = control
        # Held session handoffs (sessions.HandoffApprovals): released by their approvals like held messages.
        self.handoffs = handoffs

    async def run(self) -> None:
        delay = 0.1
        while True:
            token = ""
            try:
                token = await self.tokens.token()
                md = (("authorization", f"Bearer {token}"),)
                stream = self.stub.WatchApprovals(ppb.WatchApprovalsRequest(), metadata=md)
                await self.reconcile(md)
                async for event in stream:
                    delay = 0.1
                    await self.apply(event.approval)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and token:
                    self.tokens.invalidate(token)
                log.warning("approval watch ended (%s); following again", exc.code().name)
            except Exception as exc:
                log.warning("approval watch ended (%s); following again", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def reconcile(self, md: tuple[tuple[str, str], ...]) -> None:
        held = await self.store.held(1000)
        if self.handoffs is not None:
            held += await self.handoffs.held(1000)
        for approval_id in held:
            try:
                request = ppb.GetApprovalRequest(id=str(approval_id))
                approval = await self.stub.GetApproval(request, metadata=md, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    await self._release(approval_id, False, "its approval is gone")
                    if self.handoffs is not None:
                        await self.handoffs.release(approval_id, False, "its approval is gone")
                continue
            await self.apply(approval)

    async def apply(self, approval: ppb.Approval) -> None:
        if approval.action == "session.handoff" and self.handoffs is not None:
            await self.handoffs.apply(approval)
            return
        if approval.status == "pending" or approval.action != "message.send":
            return
        approved, reason = await answer_of(self.control, approval)
        await self._release(uuid.UUID(approval.id), approved, reason)

    async def _release(self, approval_id: uuid.UUID, approved: bool, reason: str) -> None:
        rows = await self.store.release(approval_id, approved, reason)
        if rows:
            log.info(
                "held messages released",
                extra={"approval_id": str(approval_id), "approved": approved, "count": len(rows)},
            )
            await self.hub.publish(rows)


class Sweeper:
    """Every few seconds, in every replica (each statement takes its own rows): expiry, retention, queue depth."""

    def __init__(
        self,
        settings: MessagingSettings,
        store: Store,
        hub: Hub,
        every: float = 5.0,
        streams: PartStreams | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        # Often enough that an idle stream is aborted not long after its timeout.
        self.every = min(every, settings.stream_idle_seconds / 2)
        self.streams = streams

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("message sweep failed: %s", exc)
            await asyncio.sleep(self.every)

    async def sweep(self) -> None:
        expired = await self.store.expire(1000)
        if expired:
            metrics.EXPIRED.inc(len(expired))
            await self.hub.publish(expired)
        await self.store.prune(self.settings.retention_seconds, 5000)
        if self.streams is not None:
            await self.streams.sweep()
        depth = await self.store.depth()
        metrics.QUEUE_DEPTH.clear()
        for (transport, status), count in depth.items():
            metrics.QUEUE_DEPTH.labels(transport, status).set(count)
