"""IdentityService: an admin's OAuth clients, and the authorization server's endpoints for the edge to serve."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from typing import Any

import grpc
from google.protobuf import empty_pb2
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from agentvault.common import agents as agent_rules
from agentvault.common import pagination
from agentvault.common.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable, invalid
from agentvault.common.oauth import (
    AUTH_METHODS,
    GRANT_TYPES,
    KNOWN_SCOPES,
    MAX_CLIENT_NAME,
    MAX_JWKS_BYTES,
    PRIVATE_KEY_JWT,
    SECRET_BASIC,
)
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault_registry.auth import Authenticator
from agentvault_registry.oauth_grants import AuthorizationServer, hash_secret, reply
from agentvault_registry.oauth_store import OAuthClientRecord, OAuthStore
from agentvault_registry.service_clients import SERVICE_PRINCIPAL_PREFIX

log = logging.getLogger(__name__)

CLIENT_ID_PREFIX = "avc_"
MAX_JWKS_KEYS = 10
# Members of a private JWK; a client registers public keys only.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
OFF_REASON = (
    "the OAuth authorization server is off: FEDERATION_ENCRYPTION_KEYS is not configured "
    "(its signing keys are encrypted with them)"
)


def new_client_secret() -> str:
    return secrets.token_urlsafe(32)


def client_to_proto(client: OAuthClientRecord) -> ipb.OAuthClient:
    message = ipb.OAuthClient(
        client_id=client.client_id,
        name=client.name,
        scopes=client.scopes,
        grant_types=client.grant_types,
        agent_id=str(client.agent_id or ""),
        jwks=client.jwks,
        disabled=client.disabled,
        owner_principal_id=client.owner_principal_id,
        token_endpoint_auth_method=client.token_endpoint_auth_method,
    )
    message.create_time.FromDatetime(client.created_at)
    return message


def check_jwks(v: agent_rules.Violations, text: str) -> None:
    """A JWK Set of public EC or OKP keys, at most 8 KiB."""
    if len(text.encode()) > MAX_JWKS_BYTES:
        v.add("jwks", f"must be at most {MAX_JWKS_BYTES} bytes")
        return
    try:
        document = json.loads(text)
    except ValueError:
        v.add("jwks", "must be a JSON JWK Set")
        return
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_JWKS_KEYS:
        v.add("jwks", f"must be a JWK Set: {{'keys': [...]}} with 1 to {MAX_JWKS_KEYS} keys")
        return
    for index, key in enumerate(keys):
        if not isinstance(key, dict) or key.get("kty") not in ("EC", "OKP"):
            v.add(f"jwks.keys[{index}]", "must be an EC or OKP public key")
        elif _PRIVATE_MEMBERS & key.keys():
            v.add(f"jwks.keys[{index}]", "must be a public key: private members are refused")
    if v.items:
        return
    try:
        KeySet.import_key_set(document)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        v.add("jwks", f"is not a valid JWK Set: {str(exc)[:120]}")


class IdentityServicer(ipb_grpc.IdentityServiceServicer):
    def __init__(self, store: OAuthStore, auth: Authenticator, server: AuthorizationServer | None) -> None:
        self.store = store
        self.auth = auth
        self.server = server

    def _on(self) -> AuthorizationServer:
        if self.server is None:
            raise Unavailable(OFF_REASON, "AUTHORIZATION_SERVER_OFF")
        return self.server

    async def _admin(self, context: grpc.aio.ServicerContext) -> Any:
        principal = await self.auth.require_admin(context.invocation_metadata())
        self._on()
        return principal

    async def _client(self, client_id: str) -> OAuthClientRecord:
        if not client_id:
            raise invalid("client_id", "is required")
        client = await self.store.get_client(client_id[:128])
        if client is None:
            raise NotFound(f"OAuth client {client_id[:128]} not found", "OAUTH_CLIENT_NOT_FOUND", id=client_id[:128])
        return client

    async def _changeable(self, client_id: str) -> OAuthClientRecord:
        """A client an admin may rotate, disable, enable or delete: not one of the mesh services' own, which
        SERVICE_CLIENT_SECRETS defines (changing them here would silently cut a service off, and the next start
        would undo it)."""
        client = await self._client(client_id)
        if client.owner_principal_id.startswith(SERVICE_PRINCIPAL_PREFIX):
            # Not even an admin may: the configuration owns these clients (403, like any other refused right).
            raise PermissionDenied(
                f"OAuth client {client.client_id} is a mesh service's own identity: change its secret in "
                "SERVICE_CLIENT_SECRETS (and the service's SERVICE_CLIENT_SECRET), or remove it there, and restart",
                "SERVICE_CLIENT_MANAGED",
                id=client.client_id,
            )
        return client

    # Client management -------------------------------------------------------------------------------

    async def CreateOAuthClient(
        self, request: ipb.CreateOAuthClientRequest, context: grpc.aio.ServicerContext
    ) -> ipb.CreateOAuthClientResponse:
        principal = await self._admin(context)
        v = agent_rules.Violations()
        agent_rules.check_text(v, "name", request.name, max_len=MAX_CLIENT_NAME, required=True)
        if not request.scopes:
            v.add("scopes", "at least one scope is required")
        for index, scope in enumerate(request.scopes):
            if scope not in KNOWN_SCOPES:
                v.add(f"scopes[{index}]", f"must be one of: {', '.join(KNOWN_SCOPES)}")
        grant_types = list(dict.fromkeys(request.grant_types)) or ["client_credentials"]
        for index, grant in enumerate(grant_types):
            if grant not in GRANT_TYPES:
                v.add(f"grant_types[{index}]", f"must be one of: {', '.join(GRANT_TYPES)}")
        method = request.token_endpoint_auth_method or SECRET_BASIC
        if method not in AUTH_METHODS:
            v.add("token_endpoint_auth_method", f"must be one of: {', '.join(AUTH_METHODS)}")
        if request.jwks:
            check_jwks(v, request.jwks)
        elif method == PRIVATE_KEY_JWT:
            v.add("jwks", "is required for private_key_jwt: the client's public keys")
        agent_id: uuid.UUID | None = None
        if request.agent_id:
            try:
                agent_id = uuid.UUID(request.agent_id)
            except ValueError:
                v.add("agent_id", "must be an agent's id (a UUID)")
        v.raise_if_any()
        if agent_id is not None and not await self.store.agent_exists(agent_id):
            raise NotFound(f"agent {agent_id} not found", "AGENT_NOT_FOUND", id=str(agent_id))
        # A private_key_jwt client proves itself with its keys alone: it gets no secret that could leak.
        secret = "" if method == PRIVATE_KEY_JWT else new_client_secret()
        record = OAuthClientRecord(
            client_id=CLIENT_ID_PREFIX + secrets.token_hex(16),
            name=request.name.strip(),
            scopes=sorted(set(request.scopes)),
            grant_types=grant_types,
            token_endpoint_auth_method=method,
            agent_id=agent_id,
            jwks=request.jwks,
            owner_principal_id=principal.id,
            kind="agent" if agent_id else "service",
            disabled=False,
            created_at=None,  # type: ignore[arg-type]  # set by the database
        )
        created = await self.store.create_client(record, hash_secret(secret) if secret else None)
        log.info("OAuth client created", extra={"client_id": created.client_id})
        return ipb.CreateOAuthClientResponse(client=client_to_proto(created), client_secret=secret)

    async def ListOAuthClients(
        self, request: ipb.ListOAuthClientsRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ListOAuthClientsResponse:
        await self._admin(context)
        size = pagination.page_size(request.page_size)
        after = pagination.decode(request.page_token, "oauth-clients")
        clients, position = await self.store.list_clients(size, after)
        return ipb.ListOAuthClientsResponse(
            clients=[client_to_proto(c) for c in clients],
            next_page_token=pagination.encode(position, "oauth-clients") if position else "",
        )

    async def GetOAuthClient(
        self, request: ipb.GetOAuthClientRequest, context: grpc.aio.ServicerContext
    ) -> ipb.OAuthClient:
        await self._admin(context)
        return client_to_proto(await self._client(request.client_id))

    async def RotateOAuthClientSecret(
        self, request: ipb.RotateOAuthClientSecretRequest, context: grpc.aio.ServicerContext
    ) -> ipb.RotateOAuthClientSecretResponse:
        await self._admin(context)
        client = await self._changeable(request.client_id)
        if client.token_endpoint_auth_method == PRIVATE_KEY_JWT:
            raise FailedPrecondition("a private_key_jwt client has no secret", "OAUTH_CLIENT_HAS_NO_SECRET")
        secret = new_client_secret()
        updated = await self.store.set_secret(client.client_id, hash_secret(secret))
        if updated is None:
            raise NotFound(f"OAuth client {client.client_id} not found", "OAUTH_CLIENT_NOT_FOUND", id=client.client_id)
        log.info("OAuth client secret rotated", extra={"client_id": client.client_id})
        return ipb.RotateOAuthClientSecretResponse(client=client_to_proto(updated), client_secret=secret)

    async def DisableOAuthClient(
        self, request: ipb.DisableOAuthClientRequest, context: grpc.aio.ServicerContext
    ) -> ipb.OAuthClient:
        await self._admin(context)
        client = await self._changeable(request.client_id)
        updated = await self.store.set_disabled(client.client_id, True)
        if updated is None:
            raise NotFound(f"OAuth client {client.client_id} not found", "OAUTH_CLIENT_NOT_FOUND", id=client.client_id)
        # Disabling stops the client getting new tokens and revokes what it holds: its refresh tokens and every
        # live access token issued to it, so a disabled client can do nothing, and enabling it later does not
        # revive sessions an admin meant to end.
        await self._on().revoke_client_tokens(client.client_id)
        log.info("OAuth client disabled", extra={"client_id": client.client_id})
        return client_to_proto(updated)

    async def EnableOAuthClient(
        self, request: ipb.EnableOAuthClientRequest, context: grpc.aio.ServicerContext
    ) -> ipb.OAuthClient:
        await self._admin(context)
        client = await self._changeable(request.client_id)
        updated = await self.store.set_disabled(client.client_id, False)
        if updated is None:
            raise NotFound(f"OAuth client {client.client_id} not found", "OAUTH_CLIENT_NOT_FOUND", id=client.client_id)
        log.info("OAuth client enabled", extra={"client_id": client.client_id})
        return client_to_proto(updated)

    async def DeleteOAuthClient(
        self, request: ipb.DeleteOAuthClientRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._admin(context)
        client = await self._changeable(request.client_id)
        try:
            live = await self.store.delete_client(client.client_id)
        except LookupError:
            raise NotFound(
                f"OAuth client {client.client_id} not found", "OAUTH_CLIENT_NOT_FOUND", id=client.client_id
            ) from None
        await self._on().revoke_live(client.client_id, live)
        log.info("OAuth client deleted", extra={"client_id": client.client_id})
        return empty_pb2.Empty()

    # The authorization server's endpoints, for the edge ------------------------------------------------

    async def Token(self, request: ipb.TokenRequest, context: grpc.aio.ServicerContext) -> ipb.OAuthReply:
        if self.server is None:
            return _off_reply()
        return await self.server.token(request.form, request.authorization_header, request.source)

    async def Introspect(self, request: ipb.IntrospectRequest, context: grpc.aio.ServicerContext) -> ipb.OAuthReply:
        if self.server is None:
            return _off_reply()
        return await self.server.introspect(request.form, request.authorization_header, request.source)

    async def Revoke(self, request: ipb.RevokeRequest, context: grpc.aio.ServicerContext) -> ipb.OAuthReply:
        if self.server is None:
            return _off_reply()
        return await self.server.revoke(request.form, request.authorization_header, request.source)

    async def GetJwks(self, request: ipb.GetJwksRequest, context: grpc.aio.ServicerContext) -> ipb.Jwks:
        server = self._on()
        return ipb.Jwks(json=json.dumps(await server.keys.jwks(), separators=(",", ":")))

    async def GetServerMetadata(
        self, request: ipb.GetServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ServerMetadata:
        return ipb.ServerMetadata(json=json.dumps(self._on().metadata(), separators=(",", ":")))


def _off_reply() -> ipb.OAuthReply:
    return reply(503, {"error": "temporarily_unavailable", "error_description": OFF_REASON}, {"Retry-After": "60"})
