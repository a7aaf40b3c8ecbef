"""The invitation handshake between meshes: issuing invitations and redeeming them (B), joining with one (A)."""

from __future__ import annotations

import base64
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import grpc
import redis.asyncio as aioredis
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2, status_pb2

from agentvault.common import agents as agent_rules
from agentvault.common import invitations as hs
from agentvault.common import pagination
from agentvault.common import peers as peers_lib
from agentvault.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
    invalid,
)
from agentvault.common.ratelimit import MinuteWindow
from agentvault.common.secretbox import DecryptionError, SecretBox
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc
from agentvault_registry.convert import to_timestamp
from agentvault_registry.federation_store import (
    PEER_WRITABLE,
    FederationStore,
    InvitationGone,
    InvitationRecord,
    PeerRecord,
)
from agentvault_registry.settings import FederationSettings

log = logging.getLogger(__name__)

CREDENTIAL_NAME = hs.NAME
REDEEM_METHOD = "/agentvault.federation.v1.FederationService/RedeemFederationInvitation"
# The inviting mesh's answer is small; anything bigger is refused by gRPC before it is parsed.
MAX_ANSWER_BYTES = 64 * 1024
CALL_TIMEOUT_SECONDS = 10.0
# What A passes on of B's refusal: bounded, printable, so B cannot put anything odd in A's answers or logs.
MAX_REMOTE_TEXT = 300
REMOTE_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
# Refusals that say something about the invitation itself (the admin needs a new code, or a fixed request).
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
}


def invitation_to_proto(inv: InvitationRecord) -> fpb.FederationInvitation:
    return fpb.FederationInvitation(
        id=inv.id,
        name=inv.name,
        create_time=to_timestamp(inv.created_at),
        expire_time=to_timestamp(inv.expires_at),
        redeem_time=to_timestamp(inv.redeemed_at),
        redeemed_by=inv.redeemed_by,
        credential_id=inv.credential_id,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def credential_name(name: str) -> str:
    """A peer's display name as a federation credential's name (1-128 of letters, digits, spaces and ._@-)."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._@-]", "-", name.strip())[:128]
    return cleaned if CREDENTIAL_NAME.match(cleaned) else ("peer-" + cleaned)[:128].rstrip() or "peer"


# ------------------------------------------------------------------------------------------ B: the inviting mesh


class Invitations:
    """The inviting mesh's admin calls (create, list, delete) and its half of the handshake (redeem)."""

    def __init__(
        self, store: FederationStore, box: SecretBox | None, settings: FederationSettings, redis: aioredis.Redis | None
    ) -> None:
        self.store = store
        self.box = box
        self.settings = settings
        self.redis = redis

    def _require_box(self) -> SecretBox:
        if self.box is None:
            raise Unavailable("FEDERATION_ENCRYPTION_KEYS is not configured on this mesh", "ENCRYPTION_KEY_MISSING")
        return self.box

    async def create(
        self, request: fpb.CreateFederationInvitationRequest, created_by: str
    ) -> fpb.CreateFederationInvitationResponse:
        violations = agent_rules.Violations()
        if not CREDENTIAL_NAME.match(request.name):
            violations.add("name", "must be 1-128 letters, digits, spaces and ._@-")
        ttl = request.ttl_seconds or hs.DEFAULT_TTL
        if not 0 < ttl <= hs.MAX_TTL:
            violations.add("ttl_seconds", f"must be 1-{hs.MAX_TTL} seconds (0: the default, {hs.DEFAULT_TTL})")
        violations.raise_if_any()
        box = self._require_box()
        inv_id = str(uuid.uuid4())
        private, public = hs.new_key_pair()
        secret = hs.new_secret()
        url = self.settings.public_url
        sealed = (box.encrypt(_b64(hs.private_bytes(private))), box.encrypt(_b64(secret)))
        inv = await self.store.insert_invitation(inv_id, request.name, sealed, (public, url), created_by, ttl)
        code = hs.InvitationCode(url, inv_id, public, secret).encode()
        log.info("federation invitation issued", extra={"invitation_id": inv.id, "peer_name": inv.name})
        return fpb.CreateFederationInvitationResponse(invitation=invitation_to_proto(inv), code=code)

    async def list(self, request: fpb.ListFederationInvitationsRequest) -> fpb.ListFederationInvitationsResponse:
        size = pagination.page_size(request.page_size)
        found, position = await self.store.list_invitations(size, pagination.decode(request.page_token, "invs"))
        return fpb.ListFederationInvitationsResponse(
            invitations=[invitation_to_proto(i) for i in found],
            next_page_token=pagination.encode(position, "invs") if position else "",
        )

    async def delete(self, request: fpb.DeleteFederationInvitationRequest) -> empty_pb2.Empty:
        if not await self.store.delete_invitation(request.id):
            raise NotFound(f"invitation {request.id} not found", "INVITATION_NOT_FOUND", id=request.id)
        log.info("federation invitation deleted", extra={"invitation_id": request.id})
        return empty_pb2.Empty()

    async def redeem(
        self, request: fpb.RedeemFederationInvitationRequest, source: str
    ) -> fpb.RedeemFederationInvitationResponse:
        """B's half: the proof checked in constant time before anything else is revealed or changed; then the
        invitation is burnt, the redeemer's credential (and the redeemer as a peer) created, all in one
        transaction, and the derived key confirmed to the redeemer."""
        if not self.settings.enabled:
            raise Unauthenticated("federation is disabled on this mesh", "FEDERATION_DISABLED")
        box = self._require_box()
        await self._rate_limit(source)
        url = _check_redeem(request)
        inv = await self.store.get_invitation(request.invitation_id)
        denied = PermissionDenied("unknown invitation, or its proof does not match", "INVITATION_INVALID")
        if inv is None:
            raise denied
        try:
            secret = _unb64(box.decrypt(inv.secret_encrypted))
            private_raw = _unb64(box.decrypt(inv.private_key_encrypted)) if inv.private_key_encrypted else None
        except DecryptionError:
            log.error("invitation %s cannot be decrypted; check FEDERATION_ENCRYPTION_KEYS", inv.id)
            raise Unavailable("this invitation cannot be read on this mesh", "ENCRYPTION_KEY_MISSING") from None
        transcript = hs.transcript(
            inv.id, inv.public_key, request.public_key, inv.inviter_url, url, request.credential_id
        )
        if not hs.proof_matches(secret, transcript, request.proof):
            log.warning("invitation redemption with a wrong proof", extra={"invitation_id": inv.id, "source": source})
            raise denied
        if url in (inv.inviter_url, self.settings.public_url):
            raise invalid("registry_url", "is this mesh's own URL: a mesh cannot redeem its own invitation")
        if inv.redeemed_at is not None or private_raw is None:
            raise FailedPrecondition("this invitation has already been redeemed", "INVITATION_REDEEMED")
        if inv.expires_at <= datetime.now(UTC):
            raise FailedPrecondition("this invitation has expired; ask for a new one", "INVITATION_EXPIRED")
        try:
            keys = hs.derive(hs.load_private(private_raw), request.public_key, secret, transcript)
        except hs.KeyAgreementError as exc:
            raise invalid("public_key", str(exc)) from None
        cred_ab = hs.new_credential_id()
        peer: dict[str, Any] | None = None
        if url:
            if await self.store.peer_url_taken(url):
                raise AlreadyExists(f"a peer with registry_url {url!r} already exists", "PEER_EXISTS", registry_url=url)
            token_ba = hs.token(request.credential_id, keys.k_ba)
            peer = {"name": inv.name, "registry_url": url, "api_key": box.encrypt(token_ba), "is_active": True}
        credential = (cred_ab, inv.name, box.encrypt(hs.token(cred_ab, keys.k_ab)))
        try:
            await self.store.redeem_invitation(inv.id, url, credential, peer)
        except InvitationGone:
            raise FailedPrecondition(
                "this invitation has already been redeemed or has expired", "INVITATION_REDEEMED"
            ) from None
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"a peer with registry_url {url!r} already exists", "PEER_EXISTS") from None
        log.info(
            "federation invitation redeemed",
            extra={"invitation_id": inv.id, "peer_name": inv.name, "credential_id": cred_ab, "registry_url": url},
        )
        return fpb.RedeemFederationInvitationResponse(
            credential_id=cred_ab,
            confirmation=hs.confirmation(keys.k_ba, transcript, cred_ab),
            registry_name=self.settings.registry_name,
            peer_created=peer is not None,
        )

    async def _rate_limit(self, source: str) -> None:
        if self.redis is None:
            raise Unavailable("the rate limiter is unavailable", "FEDERATION_REDIS_DOWN")
        now = datetime.now(UTC).timestamp()
        window = MinuteWindow.of(f"invitation:rate:{source}", now)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                window.count(pipe)
                results = await pipe.execute()
        except Exception as exc:
            raise Unavailable(
                f"the rate limiter is unavailable: {type(exc).__name__}", "FEDERATION_REDIS_DOWN"
            ) from None
        limit = self.settings.invitation_rate_limit_per_minute
        if int(results[0]) > limit:
            retry = window.retry_after(now)
            raise RateLimited(
                f"at most {limit} invitation redemptions per minute; retry in {retry} s",
                "INVITATION_RATE_LIMITED",
                retry,
            )


def _check_redeem(request: fpb.RedeemFederationInvitationRequest) -> str:
    """The redeemer's URL, normalized; every malformed field is reported at once."""
    v = agent_rules.Violations()
    try:
        uuid.UUID(request.invitation_id)
    except ValueError:
        v.add("invitation_id", "must be a UUID")
    if len(request.public_key) != hs.KEY_BYTES:
        v.add("public_key", f"must be {hs.KEY_BYTES} bytes (an X25519 public key)")
    if len(request.proof) != 32:
        v.add("proof", "must be 32 bytes (an HMAC-SHA256)")
    if not hs.is_credential_id(request.credential_id):
        v.add("credential_id", f"must be {hs.CREDENTIAL_ID_HEX} lowercase hexadecimal characters")
    url = request.registry_url.rstrip("/")
    if url:
        agent_rules.check_url(v, "registry_url", url, ("http", "https"), required=True)
        if len(url) > hs.MAX_URL_LENGTH:
            v.add("registry_url", f"must be at most {hs.MAX_URL_LENGTH} characters")
    v.raise_if_any()
    return url


def source_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port (`ipv4:1.2.3.4:5678` -> `1.2.3.4`): the redeem call's rate-limit key.
    A call through the edge counts against the edge's address."""
    peer = context.peer() or ""
    _, _, address = peer.partition(":")
    host = address.rsplit(":", 1)[0] if address.count(":") >= 1 else address
    return host[:100] or "unknown"


# ------------------------------------------------------------------------------------------ A: the invited mesh


class Joiner:
    """The invited mesh's half: CreatePeer with an invitation code instead of an api_key."""

    def __init__(self, store: FederationStore, box: SecretBox | None, settings: FederationSettings | None) -> None:
        self.store = store
        self.box = box
        self.settings = settings

    async def join(self, peer: fpb.Peer, validate: Any, created_by: str) -> PeerRecord:
        """`validate(peer, paths)` is PeerServicer.values: the peer's fields are checked as for any peer."""
        v = agent_rules.Violations()
        code: hs.InvitationCode | None = None
        if peer.api_key:
            v.add("peer.api_key", "must be empty with an invitation: the tokens are agreed with the inviting mesh")
        try:
            code = hs.decode_code(peer.invitation)
        except hs.InvitationCodeError as exc:
            v.add("peer.invitation", str(exc))
        if code is not None and peer.registry_url and peer.registry_url.rstrip("/") != code.registry_url:
            v.add("peer.registry_url", f"must be empty or the URL the invitation names ({code.registry_url})")
        v.raise_if_any()
        assert code is not None
        if self.box is None or self.settings is None:
            raise Unavailable("FEDERATION_ENCRYPTION_KEYS is not configured on this mesh", "ENCRYPTION_KEY_MISSING")
        if code.registry_url == self.settings.public_url:
            raise invalid("peer.invitation", "was issued by this mesh itself; redeem it on the mesh it invites")
        filled = fpb.Peer()
        filled.CopyFrom(peer)
        filled.registry_url = code.registry_url
        filled.ClearField("invitation")
        values: dict[str, Any] = validate(filled, [p for p in PEER_WRITABLE if p != "api_key"])
        if await self.store.peer_url_taken(values["registry_url"]):
            raise AlreadyExists(
                f"a peer with registry_url {values['registry_url']!r} already exists",
                "PEER_EXISTS",
                registry_url=values["registry_url"],
            )
        private, public = hs.new_key_pair()
        cred_ba = hs.new_credential_id()
        own_url = self.settings.public_url
        transcript = hs.transcript(code.invitation_id, code.public_key, public, code.registry_url, own_url, cred_ba)
        try:
            # Before B is called: a code with an unusable key must not burn the invitation.
            keys = hs.derive(private, code.public_key, code.secret, transcript)
        except hs.KeyAgreementError as exc:
            raise invalid("peer.invitation", str(exc)) from None
        request = fpb.RedeemFederationInvitationRequest(
            invitation_id=code.invitation_id,
            public_key=public,
            registry_url=own_url,
            credential_id=cred_ba,
            proof=hs.proof(code.secret, transcript),
        )
        reply = await self._call_inviter(code.registry_url, request)
        # Everything B sent is checked before it is used.
        if not hs.is_credential_id(reply.credential_id) or len(reply.confirmation) != 32:
            raise FailedPrecondition("the inviting mesh answered with a malformed handshake", "INVITER_ANSWER_INVALID")
        if not hs.confirmation_matches(keys.k_ba, transcript, reply.credential_id, reply.confirmation):
            raise FailedPrecondition(
                "the inviting mesh did not derive the same keys (key confirmation failed)", "INVITER_ANSWER_INVALID"
            )
        values["api_key"] = self.box.encrypt(hs.token(reply.credential_id, keys.k_ab))
        credential = (cred_ba, credential_name(values["name"]), self.box.encrypt(hs.token(cred_ba, keys.k_ba)))
        try:
            record = await self.store.link_peer(values, credential, created_by)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists("a peer with that registry_url was added meanwhile", "PEER_EXISTS") from None
        log.info(
            "peer joined by invitation",
            extra={"peer_id": record.id, "registry_url": record.registry_url, "credential_id": cred_ba},
        )
        return record

    async def _call_inviter(
        self, url: str, request: fpb.RedeemFederationInvitationRequest
    ) -> fpb.RedeemFederationInvitationResponse:
        """RedeemFederationInvitation on the gRPC endpoint B's discovery document names, over mutual TLS when B
        requires it (with this mesh's federation certificate)."""
        assert self.settings is not None
        try:
            async with aiohttp.ClientSession() as session:
                found = await peers_lib.discover(session, url, CALL_TIMEOUT_SECONDS)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(
                f"cannot reach the inviting mesh at {url}: {type(exc).__name__}", "INVITER_UNAVAILABLE"
            ) from None
        if found.protocol != fpb.PEER_PROTOCOL_GRPC:
            raise FailedPrecondition(
                f"{url} publishes no agentvault federation endpoint (/.well-known/agentvault-federation)",
                "INVITER_ANSWER_INVALID",
            )
        options = [("grpc.max_receive_message_length", MAX_ANSWER_BYTES)]
        if found.mtls_required:
            if self.settings.tls is None:
                raise Unavailable(
                    "the inviting mesh requires mutual TLS but FEDERATION_TLS_CA/CERT/KEY are not set here",
                    "INVITER_UNAVAILABLE",
                )
            creds = peers_lib.client_credentials(self.settings.tls)
            channel = grpc.aio.secure_channel(found.grpc_endpoint, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(found.grpc_endpoint, options=options)
        try:
            stub = fpb_grpc.FederationServiceStub(channel)
            return await stub.RedeemFederationInvitation(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise _refusal(url, exc) from None
        finally:
            await channel.close()


def _printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text[:MAX_REMOTE_TEXT])


def _remote_reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in B's status details, when it is a plain reason word."""
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes) or len(value) > MAX_ANSWER_BYTES:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:
            return ""
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and REMOTE_REASON.match(info.reason):
                return info.reason
    return ""


def _refusal(url: str, exc: grpc.aio.AioRpcError) -> Exception:
    code = exc.code()
    details = _printable(str(exc.details() or ""))
    if code in REFUSALS:
        reason = _remote_reason(exc) or code.name
        return FailedPrecondition(
            f"the inviting mesh refused the invitation: {details}", "INVITATION_REFUSED", inviter_reason=reason
        )
    return Unavailable(f"the inviting mesh at {url} did not complete the handshake: {code.name}", "INVITER_UNAVAILABLE")
