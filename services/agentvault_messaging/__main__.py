"""Entry point of the messaging process: `agentvault-messaging`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from importlib.resources import files

import grpc

from agentvault.common import db, egress
from agentvault.common.agent_auth import AgentConnector
from agentvault.common.policy.buffered import BufferedControlPlane
from agentvault.common.policy.enforcer import Enforcer
from agentvault.common.policy.engine import PolicyEngine
from agentvault.common.policy.meter import Meter
from agentvault.common.policy.remote import RemoteControlPlane
from agentvault.common.policy.sync import PolicySync
from agentvault.common.redis import create_redis
from agentvault.common.remote_auth import CallerResolver, registry_validator
from agentvault.common.revocations import RevocationWatcher
from agentvault.common.server import GrpcServer, background, run_service
from agentvault.common.settings import Env
from agentvault.common.signed_requests import SignedRequests
from agentvault.common.token_source import BearerInterceptor, GrpcTokenSource
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.messaging.v1 import federated_messaging_pb2_grpc, messaging_service_pb2_grpc, session_service_pb2_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc
from agentvault_messaging.delivery import AgentDirectory, ApprovalFollower, DeliveryWorker, Sweeper
from agentvault_messaging.events import Hub
from agentvault_messaging.federation import (
    FEDERATION,
    FederatedMessaging,
    FederationTransport,
    PeerBook,
    PeerClient,
    StatusFollower,
)
from agentvault_messaging.parts import PartStore, PartStreams
from agentvault_messaging.servicer import MessagingServicer
from agentvault_messaging.session_federation import HandoffsAcrossMeshes
from agentvault_messaging.session_store import SessionStore
from agentvault_messaging.sessions import HandoffApprovals, HandoffSweeper, Notices, SessionRouter, SessionServicer
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import Store
from agentvault_messaging.tools.wiring import serve_tools, start_catalog
from agentvault_messaging.transports.base import Transport, load_transports

log = logging.getLogger(__name__)

# How long the service waits for its first policy set before it serves anyway (every send is then refused, the
# engine's default deny, until the set arrives).
FIRST_POLICY_SET_SECONDS = 30.0


async def build(settings: MessagingSettings, server: GrpcServer, stack: contextlib.AsyncExitStack) -> None:
    # Stateless: no session state is ever changed (the migrations' advisory lock is released by hand), so the
    # reset round trip asyncpg makes on every release is skipped.
    pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size, stateless=True)
    stack.push_async_callback(pool.close)
    await db.migrate(pool, "messaging", files("agentvault_messaging") / "migrations")
    store = Store(pool)
    redis = create_redis(settings.redis_url)
    stack.push_async_callback(redis.aclose)
    hub = Hub(redis)
    # Two channels to the registry: a plain one for the token calls and for what is done with the caller's own
    # credential (resolving callers, GetAgent as the caller sees it), and one where every call carries this
    # service's token (svc-messaging: agents:read, agents:connect, policies:read, policies:enforce).
    plain = grpc.aio.insecure_channel(settings.registry_addr)
    stack.push_async_callback(plain.close)
    identity = GrpcTokenSource(
        plain, settings.registry_addr, settings.identity.client_id, settings.identity.client_secret
    )
    own = grpc.aio.insecure_channel(settings.registry_addr, interceptors=[BearerInterceptor(identity)])
    stack.push_async_callback(own.close)
    revoked = RevocationWatcher(redis)
    background(stack, revoked.run(), "oauth-revocations")
    callers = CallerResolver(
        reg_grpc.RegistryServiceStub(plain), None, jwt=registry_validator(plain, revoked.is_revoked)
    )
    engine = PolicyEngine()
    # Streams carry the token themselves (BearerInterceptor covers unary calls only).
    sync = PolicySync(plain, identity, engine)
    background(stack, sync.run(), "policy-sync")
    control = RemoteControlPlane(own)
    buffered = BufferedControlPlane(control)
    buffered.start()
    stack.push_async_callback(buffered.stop)
    meter = Meter(redis, window_seconds=Env().float("POLICY_RATE_WINDOW_SECONDS", 60.0, minimum=1.0))
    enforcer = Enforcer(engine, buffered, meter=meter, log_allows=settings.log_allows, mesh=settings.mesh)
    transports = load_transports()
    stack.push_async_callback(_close_all, transports)
    session = egress.guarded_session(settings.block_private_agent_urls)
    stack.push_async_callback(session.close)
    connector = AgentConnector(session, settings.tls, block_private=settings.block_private_agent_urls)
    agents = AgentDirectory(reg_grpc.RegistryServiceStub(own), connector, settings.box)
    # Messages to and from agents of peer meshes (federation.py): the peers with this service's own identity.
    book = PeerBook(fed_grpc.PeerServiceStub(own), identity, settings.box)
    federation = FederationTransport(book, PeerClient(session, settings.mesh))
    transports[FEDERATION] = federation
    worker = DeliveryWorker(settings, store, hub, transports, agents, session)
    streams = PartStreams(settings, store, PartStore(pool), redis)
    servicer = MessagingServicer(
        settings,
        store,
        hub,
        callers,
        reg_grpc.RegistryServiceStub(plain),
        enforcer,
        control,
        transports,
        parts=streams,
    )
    servicer.peers = book if settings.box is not None else None
    # Sessions and their handoffs (sessions.py): the send path routes a handed-off conversation to its new owner.
    sessions_db = SessionStore(pool)
    notices = Notices(hub)
    handoff_sweeper = HandoffSweeper(sessions_db, notices, every=min(5.0, settings.poll_seconds * 5))
    servicer.sessions = SessionRouter(sessions_db)
    session_servicer = SessionServicer(
        settings,
        sessions_db,
        notices,
        handoff_sweeper,
        callers,
        reg_grpc.RegistryServiceStub(plain),
        enforcer,
        control,
        store,
        hub,
    )
    env = Env()
    peer_requests = SignedRequests(
        redis,
        scope="federated-messages",
        max_age=env.int("FEDERATION_SIGNATURE_MAX_AGE", 300, minimum=1, maximum=86_400),
        per_minute=env.int("FEDERATION_RATE_LIMIT_PER_MINUTE", 600, minimum=1),
    )
    peer_facing = FederatedMessaging(servicer, peer_requests, reg_grpc.RegistryServiceStub(own))
    # Session handoffs to and from agents of peer meshes (session_federation.py).
    across = None
    if settings.box is not None:
        across = HandoffsAcrossMeshes(settings, sessions_db, notices, enforcer, store, hub, book, federation.client)
        across.recipient = peer_facing._recipient
        across.control = control
        session_servicer.across = servicer.handoffs_away = peer_facing.handoffs = across
    try:
        await asyncio.wait_for(sync.loaded.wait(), FIRST_POLICY_SET_SECONDS)
    except TimeoutError:
        log.warning("no policy set from the registry yet; sends are refused until one arrives")
    server.serve(messaging_service_pb2_grpc.add_MessagingServiceServicer_to_server, servicer)
    server.serve(session_service_pb2_grpc.add_SessionServiceServicer_to_server, session_servicer)
    server.serve(federated_messaging_pb2_grpc.add_FederatedMessagingServiceServicer_to_server, peer_facing)
    # Stopped first, after the server: nothing delivers through a closed session or pool.
    background(stack, hub.run(), "message-events")
    background(stack, worker.run(), "message-delivery")
    background(stack, StatusFollower(settings, store, hub, federation).run(), "federated-statuses")
    handoffs = HandoffApprovals(sessions_db, notices, buffered)
    handoffs.across = across
    background(
        stack, ApprovalFollower(plain, identity, store, hub, buffered, handoffs=handoffs).run(), "message-approvals"
    )
    background(stack, handoff_sweeper.run(), "handoff-sweeper")
    if across is not None:
        background(stack, across.run(), "handoffs-across-meshes")
    start_catalog(
        stack, reg_grpc.RegistryServiceStub(own), agents, block_private=settings.block_private_agent_urls, pool=pool
    )
    tools = serve_tools(
        server,
        callers=callers,
        registry=reg_grpc.RegistryServiceStub(plain),
        own_channel=own,
        agents=agents,
        enforcer=enforcer,
        control=control,
        mesh=settings.mesh,
        block_private=settings.block_private_agent_urls,
        peer_facing=peer_facing,
        book=servicer.peers,
        peer_client=federation.client,
    )
    stack.push_async_callback(tools.sessions.close)
    background(stack, streams.run(), "part-wakeups")
    background(stack, Sweeper(settings, store, hub, streams=streams).run(), "message-sweeper")
    log.info(
        "messaging started",
        extra={"transports": sorted(transports), "max_attempts": settings.max_attempts},
    )


async def _close_all(transports: Mapping[str, Transport]) -> None:
    for transport in transports.values():
        with contextlib.suppress(Exception):
            await transport.close()


def main() -> None:
    run_service("agentvault_messaging", MessagingSettings.load, build)


if __name__ == "__main__":
    main()
