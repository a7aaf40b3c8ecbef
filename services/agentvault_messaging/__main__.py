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
from agentvault.common.token_source import BearerInterceptor, GrpcTokenSource
from agentvault.messaging.v1 import messaging_service_pb2_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc
from agentvault_messaging.delivery import AgentDirectory, ApprovalFollower, DeliveryWorker, Sweeper
from agentvault_messaging.events import Hub
from agentvault_messaging.servicer import MessagingServicer
from agentvault_messaging.settings import MessagingSettings
from agentvault_messaging.store import Store
from agentvault_messaging.transports.base import Transport, load_transports

log = logging.getLogger(__name__)

# How long the service waits for its first policy set before it serves anyway (every send is then refused, the
# engine's default deny, until the set arrives).
FIRST_POLICY_SET_SECONDS = 30.0


async def build(settings: MessagingSettings, server: GrpcServer, stack: contextlib.AsyncExitStack) -> None:
    pool = await db.create_pool(settings.database_url, max_size=settings.db_pool_size)
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
    worker = DeliveryWorker(settings, store, hub, transports, agents, session)
    servicer = MessagingServicer(
        settings, store, hub, callers, reg_grpc.RegistryServiceStub(plain), enforcer, control, transports
    )
    try:
        await asyncio.wait_for(sync.loaded.wait(), FIRST_POLICY_SET_SECONDS)
    except TimeoutError:
        log.warning("no policy set from the registry yet; sends are refused until one arrives")
    server.serve(messaging_service_pb2_grpc.add_MessagingServiceServicer_to_server, servicer)
    # Stopped first, after the server: nothing delivers through a closed session or pool.
    background(stack, hub.run(), "message-events")
    background(stack, worker.run(), "message-delivery")
    background(stack, ApprovalFollower(plain, identity, store, hub, buffered).run(), "message-approvals")
    background(stack, Sweeper(settings, store, hub).run(), "message-sweeper")
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
