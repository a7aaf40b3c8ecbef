"""Federation on the registry: peer administration (PeerService) and the signed peer-facing API
(FederationService), with the credentials this mesh issues to its peers."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import redis.asyncio as aioredis
from google.protobuf import empty_pb2

from agentvault.common import agents as agent_rules
from agentvault.common import pagination, signing
from agentvault.common.auth import Principal, Role, bearer_token
from agentvault.common.batching import BatchWriter
from agentvault.common.errors import (
    AlreadyExists,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    invalid,
)
from agentvault.common.interceptors import metadata_value
from agentvault.common.ratelimit import MinuteWindow
from agentvault.common.secretbox import DecryptionError, SecretBox
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_registry.auth import Authenticator
from agentvault_registry.cache import MEMORY_PER_WIRE_BYTE, AgentCache
from agentvault_registry.federation_store import CredentialRecord, FederationStore, InboundLogRow, PeerRecord
from agentvault_registry.servicer import SHARING, EnumWords, agent_to_proto, search_filters, to_timestamp
from agentvault_registry.settings import FederationSettings
from agentvault_registry.store import Store

log = logging.getLogger(__name__)

TOKEN_PREFIX = "avf"  # noqa: S105 - a public prefix, not a secret
SEARCH_METHOD = "/agentvault.federation.v1.FederationService/SearchAgents"
GENERATION_METHOD = "/agentvault.federation.v1.FederationService/GetSharingGeneration"
LIST_METHOD = "/agentvault.registry.v1.RegistryService/ListAgents"
PEER_STATUS = EnumWords(fpb.PeerStatus.DESCRIPTOR, "PEER_STATUS_")
PEER_PROTOCOL = {fpb.PEER_PROTOCOL_UNSPECIFIED: "auto", fpb.PEER_PROTOCOL_GRPC: "grpc", fpb.PEER_PROTOCOL_REST: "rest"}
PROTOCOL_NUMBER = {v: k for k, v in PEER_PROTOCOL.items()}
CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")
GRPC_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,250}:\d{1,5}$")
MAX_PEER_NAME = 255
MAX_PEER_URL = 500
MAX_API_KEY = 512
MAX_METADATA = 20
# How long inbound-log rows wait for others to share their database write.
INBOUND_LOG_LINGER_SECONDS = 0.1


def peer_to_proto(peer: PeerRecord) -> fpb.Peer:
    return fpb.Peer(
        id=peer.id,
        name=peer.name,
        registry_url=peer.registry_url,
        is_active=peer.is_active,
        health_status=PEER_STATUS.number(peer.health_status),
        agent_count=peer.agent_count,
        last_sync=to_timestamp(peer.last_sync),
        last_health_check=to_timestamp(peer.last_health_check),
        protocol=PROTOCOL_NUMBER.get(peer.protocol, 0),  # type: ignore[arg-type]
        grpc_endpoint=peer.grpc_endpoint,
        require_mtls=peer.require_mtls,
        metadata=peer.metadata,
        create_time=to_timestamp(peer.created_at),
        update_time=to_timestamp(peer.updated_at),
        consecutive_failures=peer.consecutive_failures,
        is_down=peer.is_down,
    )


def credential_to_proto(cred: CredentialRecord) -> fpb.FederationCredential:
    return fpb.FederationCredential(
        id=cred.id,
        name=cred.name,
        create_time=to_timestamp(cred.created_at),
        revoke_time=to_timestamp(cred.revoked_at),
        last_used_time=to_timestamp(cred.last_used_at),
    )


class FederationGate:
    """Admits a peer's call: its token, its HMAC signature, freshness, no replay, and its rate."""

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
        self.redis = redis
        self.settings = settings
        # Credentials by id with the SHA-256 of their token (never the token itself); revocation drops them.
        self.cache = cache

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
        signature = metadata_value(metadata, signing.SIGNATURE_HEADER)
        if signature or self.settings.require_signature:
            if not signature:
                raise Unauthenticated("this mesh requires signed federation requests", "SIGNATURE_MISSING")
            self._check_signature(metadata, signature, token, grpc_method, request)
        await self._admit_once(cred, signature)
        return cred, metadata_value(metadata, signing.REGISTRY_HEADER)[:255]

    async def _credential(self, token: str) -> CredentialRecord:
        prefix, _, rest = token.partition("_")
        cred_id, _, secret = rest.partition("_")
        if prefix != TOKEN_PREFIX or len(cred_id) != 16 or not secret or self.box is None:
            raise Unauthenticated("invalid federation token", "INVALID_CREDENTIAL")
        known: tuple[CredentialRecord, bytes] | None = self.cache.get_credential(cred_id)
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
                    self.cache.put_credential(cred_id, (cred, expected), version)
        else:
            cred, expected = known
        presented = hashlib.sha256(token.encode()).digest()
        if cred is None or not expected or not hmac.compare_digest(presented, expected) or cred.revoked_at:
            raise Unauthenticated("invalid or revoked federation token", "INVALID_CREDENTIAL")
        return cred

    def _check_signature(self, metadata: Any, signature: str, token: str, grpc_method: str, request: Any) -> None:
        nonce = metadata_value(metadata, signing.NONCE_HEADER)
        http_method = metadata_value(metadata, "x-http-method")
        if http_method:
            # Came through the edge in the seed's HTTP form: the peer signed the HTTP request line.
            path = metadata_value(metadata, "x-http-path")
            _require_query_matches(path, request)
            method, body = http_method, _body_text(metadata)
        else:
            method, path = signing.GRPC_METHOD, grpc_method
            body = signing.grpc_body(request.SerializeToString(deterministic=True))
        try:
            signing.verify(signature, method, path, body, token, max_age=self.settings.signature_max_age, nonce=nonce)
        except signing.SignatureError as exc:
            raise Unauthenticated(f"federation signature rejected: {exc}", "SIGNATURE_INVALID") from None

    async def _admit_once(self, cred: CredentialRecord, signature: str) -> None:
        """One Redis round trip: the signature (if any) is recorded so it is accepted only once, and the call is
        counted against the credential's rate. Fails closed: without Redis neither can be enforced."""
        rate = MinuteWindow.of(f"federation:rate:{cred.id}", time.time())
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if signature:
                    # The key lives as long as the signature could still be fresh.
                    ttl = self.settings.signature_max_age + signing.MAX_FUTURE_SKEW_SECONDS
                    pipe.set(f"federation:replay:{signature}", b"1", nx=True, ex=ttl)
                rate.count(pipe)
                results = await pipe.execute()
        except Exception as exc:
            raise Unavailable(
                f"replay protection and rate limiter unavailable: {type(exc).__name__}", "FEDERATION_REDIS_DOWN"
            ) from None
        if signature and not results[0]:
            raise Unauthenticated("federation request replayed", "SIGNATURE_REPLAYED")
        count = results[-2]
        if int(count) > self.settings.rate_limit_per_minute:
            raise ResourceExhausted(
                f"federation rate limit of {self.settings.rate_limit_per_minute} requests per minute exceeded",
                "FEDERATION_RATE_LIMITED",
            )


def _body_text(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-http-body-bin" and isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
    return ""


def _require_query_matches(path: str, request: Any) -> None:
    """In the HTTP form the signature covers the URL, so the request the edge built from it must match it."""
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)
    for field in ("search", "agent_type", "tag", "capability_name", "capability_version"):
        if hasattr(request, field) and getattr(request, field) != (query.get(field) or [""])[0]:
            raise Unauthenticated("signed URL does not match the request", "SIGNATURE_INVALID")


class PeerServicer(fpb_grpc.PeerServiceServicer):
    def __init__(self, store: FederationStore, auth: Authenticator, box: SecretBox | None, cache: AgentCache) -> None:
        self.store = store
        self.auth = auth
        self.box = box
        self.cache = cache

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
        await self.auth.require_admin(context.invocation_metadata())
        from agentvault_registry.federation_store import PEER_WRITABLE

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
        await self.auth.require_admin(context.invocation_metadata())
        size = pagination.page_size(request.page_size)
        peers, position = await self.store.list_peers(size, pagination.decode(request.page_token, "peers"))
        return fpb.ListPeersResponse(
            peers=[peer_to_proto(p) for p in peers],
            next_page_token=pagination.encode(position, "peers") if position else "",
        )

    async def GetPeer(self, request: fpb.GetPeerRequest, context: grpc.aio.ServicerContext) -> fpb.Peer:
        await self.auth.require_admin(context.invocation_metadata())
        peer = await self.store.get_peer(request.peer_id)
        if peer is None:
            raise NotFound(f"peer {request.peer_id} not found", "PEER_NOT_FOUND", peer_id=request.peer_id)
        return peer_to_proto(peer)

    async def UpdatePeer(self, request: fpb.UpdatePeerRequest, context: grpc.aio.ServicerContext) -> fpb.Peer:
        await self.auth.require_admin(context.invocation_metadata())
        if not request.peer.id:
            raise invalid("peer.id", "is required")
        paths = list(request.update_mask.paths)
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
        await self.auth.require_admin(context.invocation_metadata())
        if not await self.store.delete_peer(request.peer_id):
            raise NotFound(f"peer {request.peer_id} not found", "PEER_NOT_FOUND", peer_id=request.peer_id)
        return empty_pb2.Empty()

    async def ReportPeerHealth(
        self, request: fpb.ReportPeerHealthRequest, context: grpc.aio.ServicerContext
    ) -> fpb.Peer:
        await self.auth.require_admin(context.invocation_metadata())
        status = PEER_STATUS.word(request.status, "status", required=True)
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
        await self.auth.require_admin(context.invocation_metadata())
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
        admin = await self.auth.require_admin(context.invocation_metadata())
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
        await self.auth.require_admin(context.invocation_metadata())
        size = pagination.page_size(request.page_size)
        creds, position = await self.store.list_credentials(size, pagination.decode(request.page_token, "creds"))
        return fpb.ListFederationCredentialsResponse(
            credentials=[credential_to_proto(c) for c in creds],
            next_page_token=pagination.encode(position, "creds") if position else "",
        )

    async def RevokeFederationCredential(
        self, request: fpb.RevokeFederationCredentialRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederationCredential:
        await self.auth.require_admin(context.invocation_metadata())
        if not request.id or len(request.id) > 32:
            raise invalid("id", "is required (at most 32 characters)")
        cred = await self.store.revoke_credential(request.id)
        if cred is None:
            raise NotFound(f"federation credential {request.id} not found", "CREDENTIAL_NOT_FOUND", id=request.id)
        await self.cache.invalidate_credential(cred.id)
        log.info("federation credential revoked", extra={"credential_id": cred.id, "peer_name": cred.name})
        return credential_to_proto(cred)


def shareable(agent: agent_rules.Agent) -> pb.Agent:
    """What a peer may see of an agent: no owner identity, no internal health-check address."""
    proto = agent_to_proto(agent)
    proto.owner = ""
    proto.health_check_url = ""
    return proto


class SharedAnswer:
    """Federated agents matching one query, and the replies built from them, each built once."""

    __slots__ = ("_list_reply", "_registry_name", "_search_reply", "agents", "generation", "weight")

    def __init__(self, agents: list[pb.Agent], registry_name: str, generation: int = 0) -> None:
        self.agents = agents
        self._registry_name = registry_name
        # The sharing generation read before the agents were: the answer is at least as new as it.
        self.generation = generation
        self._search_reply: fpb.SearchAgentsResponse | None = None
        self._list_reply: pb.ListAgentsResponse | None = None
        # What the answer may cost in memory: the agents and the copies in its replies (about 1.2 times the
        # serialized size each; both replies are rarely built, the seed's REST form being the exception).
        self.weight = 2 * MEMORY_PER_WIRE_BYTE * sum(a.ByteSize() for a in agents)

    def search_reply(self) -> fpb.SearchAgentsResponse:
        if self._search_reply is None:
            self._search_reply = fpb.SearchAgentsResponse(
                agents=self.agents, registry_name=self._registry_name, generation=self.generation
            )
        return self._search_reply

    def list_reply(self) -> pb.ListAgentsResponse:
        if self._list_reply is None:
            self._list_reply = pb.ListAgentsResponse(agents=self.agents)
        return self._list_reply


class FederationServicer(fpb_grpc.FederationServiceServicer):
    def __init__(
        self,
        store: Store,
        fed_store: FederationStore,
        gate: FederationGate,
        settings: FederationSettings,
        cache: AgentCache,
    ) -> None:
        self.store = store
        self.fed_store = fed_store
        self.gate = gate
        self.settings = settings
        self.cache = cache
        # federation_inbound_log and the credentials' last use are written in batches, off the request path.
        self.inbound_log: BatchWriter[InboundLogRow] = BatchWriter(
            "federation_inbound_log", fed_store.log_inbound, linger=INBOUND_LOG_LINGER_SECONDS
        )

    async def search_shared(
        self, raw_query: dict[str, Any], limit: int, cred: CredentialRecord, peer_registry: str, method: str
    ) -> SharedAnswer:
        """Federated agents matching the query, logged as one inbound federation query.

        Every peer gets the same answer to the same query (they all see exactly the `federated` agents), so
        answers are kept in the agent cache, which any agent write anywhere empties."""
        start = time.perf_counter()
        query = agent_rules.build_query({**raw_query, "sharing": "federated"})
        if limit < 0:
            raise invalid("page_size", "must not be negative")
        size = min(limit or self.settings.max_results_per_peer, self.settings.max_results_per_peer)
        key = f"{query.fingerprint()}\x1f{size}"
        result: SharedAnswer | None = self.cache.get_search(key)
        if result is None:
            version = self.cache.version
            generation = await self._generation()
            agents, _ = await self.store.list_agents(query, None, size, None)
            result = SharedAnswer([shareable(a) for a in agents], self.settings.registry_name, generation)
            self.cache.put_search(key, result, version)
        self.inbound_log.submit(
            InboundLogRow(
                credential_id=cred.id,
                peer_name=cred.name,
                peer_registry=peer_registry[:255],
                method=method,
                query={k: v for k, v in raw_query.items() if v},
                result_count=len(result.agents),
                response_time_ms=(time.perf_counter() - start) * 1000,
                created_at=datetime.now(UTC),
            )
        )
        return result

    async def SearchAgents(
        self, request: fpb.SearchAgentsRequest, context: grpc.aio.ServicerContext
    ) -> fpb.SearchAgentsResponse:
        cred, registry = await self.gate.admit(context.invocation_metadata(), SEARCH_METHOD, request)
        answer = await self.search_shared(search_filters(request), request.page_size, cred, registry, "SearchAgents")
        return answer.search_reply()

    async def GetSharingGeneration(
        self, request: fpb.GetSharingGenerationRequest, context: grpc.aio.ServicerContext
    ) -> fpb.SharingGeneration:
        await self.gate.admit(context.invocation_metadata(), GENERATION_METHOD, request)
        return fpb.SharingGeneration(generation=await self._generation())

    async def _generation(self) -> int:
        try:
            return await self.cache.generation()
        except Exception as exc:
            raise Unavailable(
                f"sharing generation unavailable: {type(exc).__name__}", "FEDERATION_REDIS_DOWN"
            ) from None

    async def GetFederationInfo(
        self, request: fpb.GetFederationInfoRequest, context: grpc.aio.ServicerContext
    ) -> fpb.FederationInfo:
        return fpb.FederationInfo(
            registry_name=self.settings.registry_name,
            protocol="agentvault-grpc/v1",
            grpc_endpoint=self.settings.public_grpc_endpoint,
            mtls_required=self.settings.tls is not None and self.settings.mtls_required,
            agent_count=await self.fed_store.count_shared_agents(),
        )


def peer_principal(cred: CredentialRecord) -> Principal:
    return Principal(cred.name, Role.MEMBER, cred.id, is_peer=True, id=f"peer:{cred.id}")


__all__ = ["SHARING", "FederationGate", "FederationServicer", "PeerServicer", "peer_principal"]
