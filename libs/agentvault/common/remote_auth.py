"""Who is calling, in services that do not own credentials: a JWT access token is validated here against the
registry's JWKS (fetched over the registry channel, cached); other credentials are resolved by the registry
(GetCaller) and cached briefly by the token's SHA-256; the bootstrap token is recognised locally."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from agentvault.common.auth import (
    BOOTSTRAP_PRINCIPAL_ID,
    BOOTSTRAP_PRINCIPAL_NAME,
    Role,
    acting_principal,
    bearer_token,
)
from agentvault.common.errors import PermissionDenied, Unauthenticated, Unavailable
from agentvault.common.jwt_auth import JwtValidator, RevocationCheck, looks_like_jwt
from agentvault.common.lru import Lru
from agentvault.common.principal import (
    ADMIN_SCOPE,
    ROLE_SCOPES,
    Kind,
    Principal,
    parse_scopes,
    peer,
    person,
    require_principal,
)
from agentvault.common.settings import Env
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.registry.v1 import registry_service_pb2 as reg_pb

log = logging.getLogger(__name__)

# A revoked API key keeps working here for at most this long; the cache spares the registry a call per request.
# Access tokens are never cached: each is checked against the revocation set at every call.
CACHE_SECONDS = 5.0
MAX_CACHED = 10_000
CALL_TIMEOUT = 5.0
DEFAULT_AUDIENCE = "agentvault"


@dataclass(frozen=True)
class RemoteCaller:
    """The principal behind a credential (the one model, agentvault.common.principal), with the names services
    used before it."""

    principal: Principal

    @property
    def principal_id(self) -> str:
        return self.principal.id

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def is_admin(self) -> bool:
        return self.principal.is_admin

    @property
    def is_peer(self) -> bool:
        return self.principal.is_peer

    def has_scope(self, scope: str) -> bool:
        return self.principal.has_scope(scope)


def check_scope(caller: Principal, scope: str) -> None:
    """Nothing when `caller` holds `scope` (`admin` implies every scope); PermissionDenied naming it if not. Access
    tokens are told the scope they lack (SCOPE_REQUIRED). API keys keep the answer they had before scopes: what a
    member's role lacks needs an admin (ADMIN_REQUIRED), so clients reading that reason see no change."""
    if caller.has_scope(scope):
        return
    if caller.role is not None and scope not in ROLE_SCOPES[Role.MEMBER]:
        raise PermissionDenied(f"this call needs an admin credential (scope {scope!r})", "ADMIN_REQUIRED", scope=scope)
    raise PermissionDenied(f"this call needs the scope {scope!r}", "SCOPE_REQUIRED", scope=scope)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def registry_validator(
    channel: grpc.aio.Channel, revoked: RevocationCheck | None, *, audience: str | None = None
) -> JwtValidator:
    """A validator of the mesh's access tokens for a service with a channel to the registry: the JWKS and the
    issuer come from the registry's IdentityService (one source of truth, nothing to configure twice); the
    audience is OAUTH_AUDIENCE, as the registry's. Keys are asked for lazily, so the service starts without them."""
    stub = ipb_grpc.IdentityServiceStub(channel)

    async def _fetch() -> dict[str, Any]:
        if not validator.issuer:
            metadata = await stub.GetServerMetadata(ipb.GetServerMetadataRequest(), timeout=CALL_TIMEOUT)
            issuer = json.loads(metadata.json).get("issuer")
            if not isinstance(issuer, str) or not issuer:
                raise ValueError("the registry's server metadata names no issuer")
            validator.issuer = issuer
        reply = await stub.GetJwks(ipb.GetJwksRequest(), timeout=CALL_TIMEOUT)
        document: dict[str, Any] = json.loads(reply.json)
        return document

    # The issuer is learnt with the first keys, before any claim is checked against it.
    validator = JwtValidator(
        "", audience or Env().str("OAUTH_AUDIENCE", DEFAULT_AUDIENCE)[:255], _fetch, revoked=revoked
    )
    return validator


class CallerResolver:
    def __init__(
        self,
        registry: Any,
        bootstrap_token: str | None,
        cache_seconds: float = CACHE_SECONDS,
        *,
        jwt: JwtValidator | None = None,
    ) -> None:
        """`registry` is a RegistryService stub on an aio channel; `jwt` validates access tokens (without it they
        are resolved by the registry like any other credential)."""
        self.registry = registry
        self.cache_seconds = cache_seconds
        self.jwt = jwt
        self._bootstrap = _digest(bootstrap_token) if bootstrap_token else None
        # Keyed by the SHA-256 of the token, never the token; fixed-size entries, so the count bounds the bytes.
        self._cache: Lru[bytes, tuple[RemoteCaller, float]] = Lru(MAX_CACHED)

    async def resolve(self, metadata: Any, *, peers: bool = False) -> RemoteCaller | None:
        """The caller, None when the call carries no credential; Unauthenticated when it carries a bad one. A peer
        mesh's federation token is accepted only where `peers` says so: the peer-facing APIs, which check its
        request's signature themselves; everywhere else it is refused, as it was before peers were resolved."""
        caller = await self._resolve(metadata)
        if caller is not None and caller.is_peer and not peers:
            raise Unauthenticated(
                "a federation token is accepted only by the federation API", "FEDERATION_TOKEN_NOT_ACCEPTED"
            )
        return caller

    async def _resolve(self, metadata: Any) -> RemoteCaller | None:
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise Unauthenticated(str(exc), "MALFORMED_CREDENTIAL") from None
        if token is None:
            return None
        if self.jwt is not None and looks_like_jwt(token):
            return RemoteCaller(acting_principal(await self.jwt.validate(token)))
        digest = _digest(token)
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap):
            return RemoteCaller(person(BOOTSTRAP_PRINCIPAL_ID, BOOTSTRAP_PRINCIPAL_NAME, Role.ADMIN, "bootstrap"))
        now = time.monotonic()
        known = self._cache.get(digest)
        if known is not None and known[1] > now:
            return known[0]
        caller = await self._ask_registry(token)
        if self.cache_seconds > 0 and not looks_like_jwt(token):
            self._cache.put(digest, (caller, now + self.cache_seconds))
        return caller

    async def require(self, metadata: Any, *, peers: bool = False) -> RemoteCaller:
        caller = await self.resolve(metadata, peers=peers)
        require_principal(caller.principal if caller is not None else None)
        assert caller is not None
        return caller

    async def require_scope(self, metadata: Any, scope: str) -> RemoteCaller:
        """The caller when it holds `scope` (`admin` implies all); PermissionDenied naming the scope if not. An
        API key lacking what only admins hold keeps its answer from before scopes, ADMIN_REQUIRED."""
        caller = await self.require(metadata)
        check_scope(caller.principal, scope)
        return caller

    async def require_admin(self, metadata: Any) -> RemoteCaller:
        return await self.require_scope(metadata, ADMIN_SCOPE)

    async def _ask_registry(self, token: str) -> RemoteCaller:
        try:
            reply = await self.registry.GetCaller(
                reg_pb.GetCallerRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated("invalid or revoked credential", "INVALID_CREDENTIAL") from None
            log.warning("cannot resolve a caller: %s %s", exc.code().name, exc.details())
            raise Unavailable("the registry cannot check the credential now", "REGISTRY_UNAVAILABLE") from None
        return RemoteCaller(_principal_of(reply))


def _principal_of(reply: reg_pb.Caller) -> Principal:
    """The principal a GetCaller answer describes (registries before scopes answer with a role only)."""
    if reply.is_peer:
        return peer(reply.principal_id, reply.name)
    role = Role.ADMIN if reply.role == reg_pb.ROLE_ADMIN else Role.MEMBER
    if not reply.kind or reply.kind == Kind.PERSON:
        return person(reply.principal_id, reply.name, role)
    try:
        scopes = parse_scopes(list(reply.scopes))
        kind = Kind(reply.kind)
    except ValueError:
        raise Unavailable("the registry described the caller in a form not understood", "REGISTRY_ANSWER") from None
    return Principal(
        kind, reply.principal_id, scopes=scopes, name=reply.name, client_id=reply.client_id, agent_id=reply.agent_id
    )


# The name services use where all they need is the admin check.
AdminGate = CallerResolver
