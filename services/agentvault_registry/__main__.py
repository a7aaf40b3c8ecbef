"""Entry point of the registry process: `agentvault-registry`."""

from __future__ import annotations

import contextlib
import logging
import os
from importlib.resources import files

from agentvault.common import db
from agentvault.common import peers as peers_lib
from agentvault.common.jwt_auth import JwtValidator
from agentvault.common.redis import create_redis
from agentvault.common.revocations import RevocationWatcher
from agentvault.common.secretbox import SecretBox
from agentvault.common.server import GrpcServer, background, run_service
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.identity.v1 import identity_service_pb2_grpc as identity_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc
from agentvault_registry import declared_peers, service_clients
from agentvault_registry.auth import Authenticator
from agentvault_registry.cache import AgentCache
from agentvault_registry.federation_gate import FederationGate
from agentvault_registry.federation_servicer import FederationServicer
from agentvault_registry.federation_store import FederationStore
from agentvault_registry.identity_servicer import OFF_REASON, IdentityServicer
from agentvault_registry.oauth_grants import AuthorizationServer
from agentvault_registry.oauth_keys import SigningKeys
from agentvault_registry.oauth_store import OAuthStore
from agentvault_registry.peer_admin import PeerServicer
from agentvault_registry.policy_servicer import serve as serve_policies
from agentvault_registry.servicer import RegistryServicer
from agentvault_registry.settings import RegistrySettings
from agentvault_registry.store import Store, init_connection

log = logging.getLogger(__name__)


async def build(settings: RegistrySettings, server: GrpcServer, stack: contextlib.AsyncExitStack) -> None:
    pool = await db.create_pool(
        settings.database_url,
        max_size=settings.db_pool_size,
        init=init_connection,
        # Search plans depend heavily on the values (a common capability name vs. a rare one); a generic
        # plan reused for every value made capability-filtered search 20x slower at 100k agents.
        server_settings={"plan_cache_mode": "force_custom_plan"},
        stateless=True,
    )
    stack.push_async_callback(pool.close)
    await db.migrate(pool, "registry", files("agentvault_registry") / "migrations")
    redis = create_redis(settings.redis_url)
    stack.push_async_callback(redis.aclose)
    fed = settings.federation
    box = SecretBox([k.strip() for k in fed.encryption_keys.split(",") if k.strip()]) if fed.encryption_keys else None
    # The box also encrypts the secrets with which the mesh authenticates to agents.
    store = Store(pool, box)
    auth = Authenticator(store, settings.admin_token)
    if box is None:
        log.warning("FEDERATION_ENCRYPTION_KEYS is not set: peers and federation credentials are unavailable")
    fed_store = FederationStore(pool)
    if box is not None and box.key_count > 1:
        # More than one key means a rotation is under way: move every secret to the first key, after
        # which the old keys can be removed from FEDERATION_ENCRYPTION_KEYS.
        rotated = await fed_store.rotate_secrets(box.rotate_if_needed)
        log.info("federation secrets re-encrypted under the primary key", extra={"rotated": rotated})
        rotated = await store.rotate_agent_secrets(box.rotate_if_needed)
        log.info("agents' auth secrets re-encrypted under the primary key", extra={"rotated": rotated})
    cache = AgentCache(redis, settings.agent_cache_ttl, settings.agent_cache_size, settings.agent_cache_bytes)
    background(stack, cache.run(), "agent-cache")
    gate = FederationGate(fed_store, box, redis, fed, cache)
    federation = FederationServicer(store, fed_store, gate, fed, cache)
    federation.inbound_log.start()
    # Closed first (the stack unwinds in reverse): the server has stopped taking calls, so every inbound
    # query logged so far is written while the pool is still open.
    stack.push_async_callback(federation.inbound_log.stop)
    registry = RegistryServicer(store, auth, redis.ping, cache, federation)
    peers = PeerServicer(fed_store, auth, box, cache, fed)
    if fed.peers_file:
        await declared_peers.apply(fed.peers_file, os.environ, fed_store, peers)
    server.serve(registry_service_pb2_grpc.add_RegistryServiceServicer_to_server, registry)
    server.serve(fed_grpc.add_PeerServiceServicer_to_server, peers)
    server.serve(fed_grpc.add_FederationServiceServicer_to_server, federation)
    oauth_store = OAuthStore(pool)
    authz: AuthorizationServer | None = None
    if box is None:
        log.warning(OFF_REASON)
    else:
        oauth = settings.oauth
        keys = SigningKeys(oauth_store, box, oauth.key_rotation_seconds, oauth.access_token_ttl)
        background(stack, keys.run(), "oauth-signing-keys")
        authz = AuthorizationServer(oauth_store, keys, redis, oauth)
        # Access tokens are checked here with the registry's own keys (no network) and the revocations mirrored
        # from Redis, so a revoked token is refused within the channel's delay.
        revoked = RevocationWatcher(redis)
        background(stack, revoked.run(), "oauth-revocations")
        # The keys are read from this registry's own store: a kid rotated in elsewhere may be looked up each second.
        auth.jwt = JwtValidator(
            oauth.issuer, oauth.audience, keys.jwks, revoked=revoked.is_revoked, jwks_ttl=10.0, min_refresh=1.0
        )
    # The services' own clients (their identities), from SERVICE_CLIENT_SECRETS; before serving, so a service
    # starting next finds its client.
    await service_clients.apply(oauth_store, settings.service_secrets, authz.revoke_client_tokens if authz else None)
    if settings.service_secrets and authz is None:
        log.warning("SERVICE_CLIENT_SECRETS is set but no token can be issued: %s", OFF_REASON)
    server.serve(identity_grpc.add_IdentityServiceServicer_to_server, IdentityServicer(oauth_store, auth, authz))
    policy = await serve_policies(pool, redis, auth, server, stack, agents=store, mesh=fed.registry_name)
    # Peers' bad signatures and rate abuse count against their connections, and a blocked peer is shut out.
    gate.connections = policy.control
    if fed.tls is not None:
        creds = peers_lib.server_credentials(fed.tls, require_client_auth=fed.mtls_required)
        tls_port = server.add_secure_port(fed.tls_port, creds)
        log.info("federation TLS listener", extra={"port": tls_port, "mtls_required": fed.mtls_required})


def main() -> None:
    run_service("agentvault_registry", RegistrySettings.load, build)


if __name__ == "__main__":
    main()
