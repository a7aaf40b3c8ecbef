"""Peers declared in a file read at start (the seed's TRUSTED_PEERS), for operators who deploy by configuration.

FEDERATION_PEERS_FILE names a JSON file: a list (or {"peers": [...]}) of objects with `name`, `url` (or
`registry_url`), the token the peer issued to this mesh as `api_key_env` (the name of an environment variable
holding it, so no secret sits in the file) or `api_key`, and optionally `require_mtls`, `protocol`
(auto/grpc/rest) and `grpc_endpoint`. The seed's `public_key` is accepted and ignored: peers here
authenticate with HMAC tokens and, optionally, mutual TLS. Entries are validated like the API's CreatePeer
and upserted by URL; a peer an admin disabled stays disabled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agentvault.common.errors import InvalidArgument
from agentvault.common.settings import SettingsError
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault_registry.convert import PROTOCOL_NUMBER
from agentvault_registry.federation_store import PEER_WRITABLE, FederationStore
from agentvault_registry.peer_admin import PeerServicer

log = logging.getLogger(__name__)

KNOWN_KEYS = {
    "name",
    "url",
    "registry_url",
    "api_key",
    "api_key_env",
    "require_mtls",
    "protocol",
    "grpc_endpoint",
    "public_key",
}
# The words a peers file may use for a peer's protocol: the stored ones ("auto" means: probe the peer).
PROTOCOLS = PROTOCOL_NUMBER
MAX_FILE_BYTES = 1024 * 1024


def read(path: str, environ: Mapping[str, str]) -> list[fpb.Peer]:
    """The declared peers as CreatePeer would receive them; any problem is a SettingsError naming it."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise SettingsError(f"FEDERATION_PEERS_FILE {path}: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SettingsError(f"FEDERATION_PEERS_FILE {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"FEDERATION_PEERS_FILE {path}: not valid JSON ({exc})") from None
    entries = data.get("peers") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise SettingsError(f'FEDERATION_PEERS_FILE {path}: expected a list of peers or {{"peers": [...]}}')
    peers = []
    for i, entry in enumerate(entries):
        where = f"FEDERATION_PEERS_FILE {path}: peers[{i}]"
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: must be an object")
        unknown = set(entry) - KNOWN_KEYS
        if unknown:
            raise SettingsError(f"{where}: unknown keys {sorted(unknown)}")
        api_key = entry.get("api_key", "")
        if "api_key_env" in entry:
            api_key = environ.get(str(entry["api_key_env"]), "")
            if not api_key:
                raise SettingsError(f"{where}: environment variable {entry['api_key_env']} is not set")
        protocol = entry.get("protocol", "auto")
        if protocol not in PROTOCOLS:
            raise SettingsError(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}")
        try:
            peers.append(
                fpb.Peer(
                    name=str(entry.get("name", "")),
                    registry_url=str(entry.get("registry_url", entry.get("url", ""))),
                    api_key=str(api_key),
                    require_mtls=bool(entry.get("require_mtls", False)),
                    protocol=PROTOCOLS[protocol],
                    grpc_endpoint=str(entry.get("grpc_endpoint", "")),
                    metadata={"declared_in": file.name[:256]},
                )
            )
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{where}: {exc}") from None
    return peers


async def apply(path: str, environ: Mapping[str, str], store: FederationStore, peers: PeerServicer) -> int:
    """Validates every declared peer, then upserts them all; returns how many."""
    declared = read(path, environ)
    rows = []
    for i, peer in enumerate(declared):
        try:
            values = peers.values(peer, list(PEER_WRITABLE), creating=True)
        except InvalidArgument as exc:
            problems = "; ".join(f"{v.field}: {v.description}" for v in exc.violations)
            raise SettingsError(f"FEDERATION_PEERS_FILE {path}: peers[{i}]: {problems}") from None
        rows.append(values)
    for values in rows:
        await store.upsert_declared_peer(values)
    log.info("declared peers applied", extra={"count": len(rows), "file": path})
    return len(rows)
