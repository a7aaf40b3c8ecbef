"""Who may call the peer-facing API: a peer presenting a federation credential this mesh issued, whose signed
request passes agentvault.common.signed_requests."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any, Protocol

import redis.asyncio as aioredis

from agentvault.common import signing
from agentvault.common.auth import bearer_token
from agentvault.common.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from agentvault.common.interceptors import metadata_value
from agentvault.common.secretbox import DecryptionError, SecretBox
from agentvault.common.signed_requests import SignedRequests
from agentvault_registry.cache import AgentCache, KnownCredential
from agentvault_registry.convert import SIGNED_URL_FIELDS
from agentvault_registry.federation_store import CredentialRecord, FederationStore
from agentvault_registry.settings import FederationSettings

log = logging.getLogger(__name__)

TOKEN_PREFIX = "avf"  # noqa: S105 - a public prefix, not a secret


def is_federation_token(token: str) -> bool:
    """Whether a bearer token is one this mesh issues to peers (`avf_<id>_<secret>`), by its form only."""
    return token.startswith(TOKEN_PREFIX + "_")


class PeerConnections(Protocol):
    async def peer_blocked(self, name: str) -> bool: ...

    async def peer_violation(self, name: str, reason: str, *, rate: bool) -> None: ...


class FederationGate:
    """Admits a peer's call: its token, then its HMAC signature, freshness, no replay, and its rate."""

    def __init__(
        self,
        store: FederationStore,
        box: SecretBox | None,
        redis: aioredis.Redis,
        settings: FederationSettings,
        cache: AgentCache,
    ) -> None:
        self.store = store
        self.box = box
        self.settings = settings
        self.credentials = cache.credential_cache(settings.credential_cache_ttl)
        self.cache = cache
        # Set once PolicyService is built: the peers' connections (trust, violations); None leaves them untracked.
        self.connections: PeerConnections | None = None
        self.requests = SignedRequests(
            redis,
            scope="federation",
            max_age=settings.signature_max_age,
            per_minute=settings.rate_limit_per_minute,
            require_signature=settings.require_signature,
        )

    async def admit(self, metadata: Any, grpc_method: str, request: Any) -> tuple[CredentialRecord, str]:
        """The calling peer's credential and its registry name; raises Unauthenticated/ResourceExhausted."""
        if not self.settings.enabled:
            raise Unauthenticated("federation is disabled on this mesh", "FEDERATION_DISABLED")
        try:
            token = bearer_token(metadata)
        except ValueError as exc:
            raise Unauthenticated(str(exc), "MALFORMED_CREDENTIAL") from None
        if token is None:
            raise Unauthenticated("a federation token is required", "CREDENTIAL_MISSING")
        cred = await self._credential(token)
        if self.connections is not None and await self.connections.peer_blocked(cred.name):
            raise PermissionDenied(f"peer {cred.name!r} is blocked on this mesh", "PEER_BLOCKED")
        try:
            await self.requests.admit(metadata, grpc_method, request, token, cred.id, url_fields=SIGNED_URL_FIELDS)
        except (Unauthenticated, ResourceExhausted) as exc:
            # A bad or replayed signature, or rate abuse, from a peer that holds a valid token: a violation of its
            # connection, which may drop its trust (and, at blocked, shut it out).
            if self.connections is not None:
                await self.connections.peer_violation(
                    cred.name, f"{exc.reason}: {exc}", rate=isinstance(exc, ResourceExhausted)
                )
            raise
        return cred, metadata_value(metadata, signing.REGISTRY_HEADER)[:255]

    async def peer_of(self, metadata: Any) -> CredentialRecord:
        """The peer a federation token names (valid, not revoked, not blocked), for GetCaller: the mesh's services
        that serve peers check the call's signature themselves, on the request they received."""
        if not self.settings.enabled:
            raise Unauthenticated("federation is disabled on this mesh", "FEDERATION_DISABLED")
        token = bearer_token(metadata) or ""
        cred = await self._credential(token)
        if self.connections is not None and await self.connections.peer_blocked(cred.name):
            raise PermissionDenied(f"peer {cred.name!r} is blocked on this mesh", "PEER_BLOCKED")
        return cred

    async def _credential(self, token: str) -> CredentialRecord:
        prefix, _, rest = token.partition("_")
        cred_id, _, secret = rest.partition("_")
        if prefix != TOKEN_PREFIX or len(cred_id) != 16 or not secret or self.box is None:
            raise Unauthenticated("invalid federation token", "INVALID_CREDENTIAL")
        known = self.credentials.get(cred_id)
        cred: CredentialRecord | None
        if known is None:
            version = self.cache.version
            cred = await self.store.get_credential(cred_id)
            expected = b""
            if cred is not None:
                try:
                    expected = hashlib.sha256(self.box.decrypt(cred.token_encrypted).encode()).digest()
                except DecryptionError:
                    log.error("federation credential %s cannot be decrypted; check FEDERATION_ENCRYPTION_KEYS", cred_id)
                if expected:
                    self.credentials.put(cred_id, KnownCredential(cred, expected), version)
        else:
            cred, expected = known.record, known.token_sha256
        presented = hashlib.sha256(token.encode()).digest()
        if cred is None or not expected or not hmac.compare_digest(presented, expected) or cred.revoked_at:
            raise Unauthenticated("invalid or revoked federation token", "INVALID_CREDENTIAL")
        return cred
