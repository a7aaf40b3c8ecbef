"""What the mesh's own services need to reach federation peers: the peer list from the registry (keys
decrypted locally), protocol discovery from a peer's public URL, and TLS credentials for mutual TLS."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from agentvault.common.secretbox import DecryptionError, SecretBox
from agentvault.common.settings import Env
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/agentvault-federation"
PROTOCOL_ID = "agentvault-grpc/v1"
MAX_DISCOVERY_BYTES = 16 * 1024


@dataclass(frozen=True)
class PeerTarget:
    """An active peer as a client of it needs it; api_key is the decrypted token the peer issued to us."""

    id: str
    name: str
    registry_url: str
    protocol: int  # fed_pb.PeerProtocol
    grpc_endpoint: str
    require_mtls: bool
    api_key: str
    is_down: bool
    health_status: int  # fed_pb.PeerStatus


async def load_peers(
    stub: fed_grpc.PeerServiceAsyncStub, service_token: str, box: SecretBox, timeout: float = 5.0
) -> list[PeerTarget]:
    """Every active peer; a peer whose key cannot be decrypted is logged and left out, not fatal."""
    reply = await stub.ResolvePeers(
        fed_pb.ResolvePeersRequest(), metadata=(("authorization", f"Bearer {service_token}"),), timeout=timeout
    )
    peers = []
    for resolved in reply.peers:
        p = resolved.peer
        api_key = ""
        if resolved.encrypted_api_key:
            try:
                api_key = box.decrypt(resolved.encrypted_api_key)
            except DecryptionError:
                log.error("cannot decrypt the key of peer %s; check FEDERATION_ENCRYPTION_KEYS", p.name)
                continue
        peers.append(
            PeerTarget(
                id=p.id,
                name=p.name,
                registry_url=p.registry_url.rstrip("/"),
                protocol=p.protocol,
                grpc_endpoint=p.grpc_endpoint,
                require_mtls=p.require_mtls,
                api_key=api_key,
                is_down=p.is_down,
                health_status=p.health_status,
            )
        )
    return peers


@dataclass(frozen=True)
class Discovered:
    protocol: int
    grpc_endpoint: str
    mtls_required: bool


async def discover(session: aiohttp.ClientSession, registry_url: str, timeout: float) -> Discovered:
    """Reads the peer's discovery document; a peer without one is a plain REST registry.

    Raises TimeoutError / aiohttp.ClientError when the peer cannot be reached or answers 5xx, so callers
    can tell "REST peer" from "peer down".
    """
    url = registry_url.rstrip("/") + DISCOVERY_PATH
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False) as response:
        if response.status >= 500:
            # A failing server says nothing about which protocol the peer speaks: the peer is down for now.
            raise aiohttp.ClientResponseError(
                response.request_info, response.history, status=response.status, message="discovery failed"
            )
        if response.status != 200:
            return Discovered(fed_pb.PEER_PROTOCOL_REST, "", False)
        raw = await response.content.read(MAX_DISCOVERY_BYTES + 1)
    if len(raw) > MAX_DISCOVERY_BYTES:
        return Discovered(fed_pb.PEER_PROTOCOL_REST, "", False)
    try:
        import json

        doc: Any = json.loads(raw)
    except ValueError:
        return Discovered(fed_pb.PEER_PROTOCOL_REST, "", False)
    endpoint = doc.get("grpc_endpoint") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("protocol") != PROTOCOL_ID or not isinstance(endpoint, str):
        return Discovered(fed_pb.PEER_PROTOCOL_REST, "", False)
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or len(endpoint) > 300:
        return Discovered(fed_pb.PEER_PROTOCOL_REST, "", False)
    return Discovered(fed_pb.PEER_PROTOCOL_GRPC, endpoint, bool(doc.get("mtls_required", False)))


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def tls_files(env: Env | None = None) -> TlsFiles | None:
    """FEDERATION_TLS_CA / FEDERATION_TLS_CERT / FEDERATION_TLS_KEY, all three or none."""
    env = env or Env()
    values = [env.optional(v) for v in ("FEDERATION_TLS_CA", "FEDERATION_TLS_CERT", "FEDERATION_TLS_KEY")]
    if not any(values):
        return None
    if not all(values):
        from agentvault.common.settings import SettingsError

        raise SettingsError("FEDERATION_TLS_CA, FEDERATION_TLS_CERT and FEDERATION_TLS_KEY go together")
    ca, cert, key = (Path(v) for v in values if v)
    return TlsFiles(ca, cert, key)


def client_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


def server_credentials(files: TlsFiles, require_client_auth: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca.read_bytes(),
        require_client_auth=require_client_auth,
    )


async def gather_bounded(limit: int, *aws: Any) -> list[Any]:
    """asyncio.gather with at most `limit` awaitables running at once; exceptions are returned, not raised."""
    semaphore = asyncio.Semaphore(limit)

    async def run(aw: Any) -> Any:
        async with semaphore:
            return await aw

    return list(await asyncio.gather(*(run(a) for a in aws), return_exceptions=True))
