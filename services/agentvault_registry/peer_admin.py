"""PeerService: an admin's peers (the meshes this one queries) and the federation credentials it issues."""

from __future__ import annotations

import logging
import re
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
from google.protobuf import empty_pb2

from agentvault.common import agents as agent_rules
from agentvault.common import pagination
from agentvault.common.errors import AlreadyExists, NotFound, Unavailable, invalid
from agentvault.common.principal import FEDERATION_ADMIN, FEDERATION_RESOLVE, HEALTH_REPORT
from agentvault.common.secretbox import SecretBox
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault_registry.auth import Authenticator
from agentvault_registry.cache import AgentCache
from agentvault_registry.convert import PEER_PROTOCOL, PEER_STATUS, credential_to_proto, peer_to_proto, word
from agentvault_registry.federation_gate import TOKEN_PREFIX
from agentvault_registry.federation_store import PEER_WRITABLE, FederationStore, PeerRecord
from agentvault_registry.invitations import Invitations, Joiner
from agentvault_registry.settings import FederationSettings

log = logging.getLogger(__name__)

CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")
GRPC_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,250}:\d{1,5}$")
MAX_PEER_NAME = 255
MAX_PEER_URL = 500
MAX_API_KEY = 512
MAX_METADATA = 20


class PeerServicer(fpb_grpc.PeerServiceServicer):
    def __init__(
        self,
        store: FederationStore,
        auth: Authenticator,
        box: SecretBox | None,
        cache: AgentCache,
        settings: FederationSettings | None = None,
    ) -> None:
        self.store = store
        self.auth = auth
        self.box = box
        self.cache = cache
        # Invitations need this mesh's public URL; without settings (declared peers at start) they are not used.
        self.joiner = Joiner(store, box, settings)
        self.invitations = Invitations(store, box, settings, None) if settings is not None else None

    def _require_box(self) -> SecretBox:
        if self.box is None:
            raise Unavailable("FEDERATION_ENCRYPTION_KEYS is not configured on this mesh", "ENCRYPTION_KEY_MISSING")
        return self.box

    def values(self, peer: fpb.Peer, paths: list[str], *, creating: bool) -> dict[str, Any]:
        """The columns to write for `paths` of `peer`, validated; the api_key comes back encrypted."""
        v = agent_rules.Violations()
        values: dict[str, Any] = {}
        for path in paths:
            if path == "name":
                agent_rules.check_text(v, "peer.name", peer.name, max_len=MAX_PEER_NAME, required=True)
                values["name"] = peer.name.strip()
            elif path == "registry_url":
                url = peer.registry_url.rstrip("/")
                agent_rules.check_url(v, "peer.registry_url", url, ("http", "https"), required=True)
                if len(url) > MAX_PEER_URL:
                    v.add("peer.registry_url", f"must be at most {MAX_PEER_URL} characters")
                elif urlsplit(url).query or urlsplit(url).fragment:
                    v.add("peer.registry_url", "must be a base URL without query or fragment")
                values["registry_url"] = url
            elif path == "api_key":
                if creating and not peer.api_key:
                    v.add("peer.api_key", "is required: the federation token the peer issued to this mesh")
                agent_rules.check_text(v, "peer.api_key", peer.api_key, max_len=MAX_API_KEY)
                if peer.api_key:
                    values["api_key"] = self._require_box().encrypt(peer.api_key)
            elif path == "is_active":
                values["is_active"] = peer.is_active if peer.HasField("is_active") else True
            elif path == "protocol":
                if peer.protocol not in PEER_PROTOCOL:
                    v.add("peer.protocol", f"unknown value {peer.protocol}")
                values["protocol"] = PEER_PROTOCOL.get(peer.protocol, "auto")
            elif path == "grpc_endpoint":
                if peer.grpc_endpoint and not GRPC_ENDPOINT.match(peer.grpc_endpoint):
                    v.add("peer.grpc_endpoint", "must be host:port")
                values["grpc_endpoint"] = peer.grpc_endpoint
            elif path == "require_mtls":
                values["require_mtls"] = peer.require_mtls
            elif path == "metadata":
                if len(peer.metadata) > MAX_METADATA:
                    v.add("peer.metadata", f"at most {MAX_METADATA} entries")
                for key, value in peer.metadata.items():
                    if not key or len(key) > 64 or len(value) > 256:
                        v.add(f"peer.metadata[{key[:64]!r}]", "keys 1-64 and values at most 256 characters")
                values["metadata"] = dict(peer.metadata)
            else:
                v.add("update_mask", f"{path!r} cannot be updated")
        v.raise_if_any()
        return values

    async def CreatePeer(self, request: fpb.CreatePeerRequest, context: grpc.aio.ServicerContext) -> fpb.Peer:
        admin = await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        if request.peer.invitation:
            # The invitation handshake: both directions' tokens are agreed with the inviting mesh, none is copied.
            joined = await self.joiner.join(
                request.peer, lambda peer, paths: self.values(peer, paths, creating=True), admin.name
            )
            return peer_to_proto(joined)
        values = self.values(request.peer, list(PEER_WRITABLE), creating=True)
        try:
            peer = await self.store.create_peer(values)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                f"a peer with registry_url {values['registry_url']!r} already exists",
                "PEER_EXISTS",
                registry_url=values["registry_url"],
            ) from None
        log.info("peer added", extra={"peer_id": peer.id, "peer_name": peer.name, "registry_url": peer.registry_url})
        return peer_to_proto(peer)

    async def ListPeers(
        self, request: fpb.ListPeersRequest, context: grpc.aio.ServicerContext
    ) -> fpb.ListPeersResponse:
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        size = pagination.page_size(request.page_size)
        peers, position = await self.store.list_peers(size, pagination.decode(request.page_token, "peers"))
        return fpb.ListPeersResponse(
            peers=[peer_to_proto(p) for p in peers],
            next_page_token=pagination.encode(position, "peers") if position else "",
        )

    async def GetPeer(self, request: fpb.GetPeerRequest, context: grpc.aio.ServicerContext) -> fpb.Peer:
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        peer = await self.store.get_peer(request.peer_id)
        if peer is None:
            raise NotFound(f"peer {request.peer_id} not found", "PEER_NOT_FOUND", peer_id=request.peer_id)
        return peer_to_proto(peer)

    async def UpdatePeer(self, request: fpb.UpdatePeerRequest, context: grpc.aio.ServicerContext) -> fpb.Peer:
        paths = list(request.update_mask.paths)
        # The health monitor (health:report) writes back the route it learned from the peer; any other change is
        # a federation admin's.
        learned_only = bool(paths) and set(paths) <= {"protocol", "grpc_endpoint"}
        scope = HEALTH_REPORT if learned_only else FEDERATION_ADMIN
        await self.auth.require_scope(context.invocation_metadata(), scope)
        if not request.peer.id:
            raise invalid("peer.id", "is required")
        if not paths:
            # PUT: every writable field the request carries; `{"is_active": false}` alone disables the peer.
            paths = [f.name for f, _ in request.peer.ListFields() if f.name not in ("id",)]
        values = self.values(request.peer, paths, creating=False)
        try:
            peer = await self.store.update_peer(request.peer.id, values)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists("a peer with that registry_url already exists", "PEER_EXISTS") from None
        if peer is None:
            raise NotFound(f"peer {request.peer.id} not found", "PEER_NOT_FOUND", peer_id=request.peer.id)
        return peer_to_proto(peer)

    async def DeletePeer(self, request: fpb.DeletePeerRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        deleted, revoked = await self.store.delete_peer(request.peer_id)
        if not deleted:
            raise NotFound(f"peer {request.peer_id} not found", "PEER_NOT_FOUND", peer_id=request.peer_id)
        if revoked is not None:
            # The credential the invitation handshake issued to this peer goes with it: a mesh forgotten here no
            # longer calls in with it.
            await self.cache.invalidate_credential(revoked)
            log.info("federation credential revoked with its peer", extra={"credential_id": revoked})
        return empty_pb2.Empty()

    async def ReportPeerHealth(
        self, request: fpb.ReportPeerHealthRequest, context: grpc.aio.ServicerContext
    ) -> fpb.Peer:
        await self.auth.require_scope(context.invocation_metadata(), HEALTH_REPORT)
        status = word(PEER_STATUS, request.status, "status", required=True)
        if request.agent_count < 0 or request.consecutive_failures < 0:
            raise invalid("agent_count", "must not be negative")
        checked = request.check_time.ToDatetime(UTC) if request.HasField("check_time") else datetime.now(UTC)
        peer = await self.store.record_health(
            request.peer_id,
            status,
            request.agent_count if status == "healthy" else None,
            request.is_down,
            request.consecutive_failures,
            checked,
        )
        if peer is None:
            raise NotFound(f"peer {request.peer_id} not found", "PEER_NOT_FOUND", peer_id=request.peer_id)
        return peer_to_proto(peer)

    async def ResolvePeers(
        self, request: fpb.ResolvePeersRequest, context: grpc.aio.ServicerContext
    ) -> fpb.ResolvePeersResponse:
        # What discovery and the health monitor need, with their own identities: the peers and their credentials,
        # still encrypted (only services holding FEDERATION_ENCRYPTION_KEYS can read them).
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_RESOLVE)
        peers: list[PeerRecord] = []
        after = None
        while True:
            page, after = await self.store.list_peers(500, after, active_only=True)
            peers.extend(page)
            if after is None:
                break
        return fpb.ResolvePeersResponse(
            peers=[fpb.ResolvedPeer(peer=peer_to_proto(p), encrypted_api_key=p.api_key or "") for p in peers]
        )

    async def CreateFederationCredential(
        self, request: fpb.CreateFederationCredentialRequest, context: grpc.aio.ServicerContext
    ) -> fpb.CreateFederationCredentialResponse:
        admin = await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        if not CREDENTIAL_NAME.match(request.name):
            raise invalid("name", "must be 1-128 letters, digits, spaces and ._@-")
        box = self._require_box()
        cred_id = secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}_{cred_id}_{secrets.token_urlsafe(32)}"
        cred = await self.store.insert_credential(cred_id, request.name, box.encrypt(token), admin.name)
        log.info("federation credential issued", extra={"credential_id": cred.id, "peer_name": cred.name})
        return fpb.CreateFederationCredentialResponse(credential=credential_to_proto(cred), token=token)

    async def ListFederationCredentials(
        self, request: fpb.ListFederationCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> fpb.ListFederationCredentialsResponse:
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        size = pagination.page_size(request.page_size)
        creds, position = await self.store.list_credentials(size, pagination.decode(request.page_token, "creds"))
        return fpb.ListFederationCredentialsResponse(
            credentials=[credential_to_proto(c) for c in creds],
            next_page_token=pagination.encode(position, "creds") if position else "",
        )

    async def RevokeFederationCredential(
        self, request: fpb.RevokeFederationCredentialRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederationCredential:
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        if not request.id or len(request.id) > 32:
            raise invalid("id", "is required (at most 32 characters)")
        cred = await self.store.revoke_credential(request.id)
        if cred is None:
            raise NotFound(f"federation credential {request.id} not found", "CREDENTIAL_NOT_FOUND", id=request.id)
        await self.cache.invalidate_credential(cred.id)
        log.info("federation credential revoked", extra={"credential_id": cred.id, "peer_name": cred.name})
        return credential_to_proto(cred)

    def _invitations(self) -> Invitations:
        if self.invitations is None:
            raise Unavailable("invitations are not configured on this mesh", "ENCRYPTION_KEY_MISSING")
        return self.invitations

    async def CreateFederationInvitation(
        self, request: fpb.CreateFederationInvitationRequest, context: grpc.aio.ServicerContext
    ) -> fpb.CreateFederationInvitationResponse:
        admin = await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        return await self._invitations().create(request, admin.name)

    async def ListFederationInvitations(
        self, request: fpb.ListFederationInvitationsRequest, context: grpc.aio.ServicerContext
    ) -> fpb.ListFederationInvitationsResponse:
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        return await self._invitations().list(request)

    async def DeleteFederationInvitation(
        self, request: fpb.DeleteFederationInvitationRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.auth.require_scope(context.invocation_metadata(), FEDERATION_ADMIN)
        return await self._invitations().delete(request)
