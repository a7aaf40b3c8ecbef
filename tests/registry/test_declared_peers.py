"""Peers declared in FEDERATION_PEERS_FILE: applied at start, tokens from the environment, updates in place."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import grpc
import pytest

from agentvault.devserver.mesh import SERVICES
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc

from ..conftest import MeshFactory, bearer

TOKEN = "avf_0123456789abcdef_declared-peer-token-value"


def declare(path: Path, name: str) -> None:
    path.write_text(
        json.dumps(
            {
                "peers": [
                    {
                        "name": name,
                        "url": "https://partner.example",
                        "api_key_env": "PARTNER_TOKEN",
                        "require_mtls": True,
                        "public_key": "-----BEGIN PUBLIC KEY-----\n...",
                    },
                    {
                        "name": "REST only",
                        "url": "https://rest.example/",
                        "api_key": "plain-file-token",
                        "protocol": "rest",
                    },
                ]
            }
        )
    )


async def list_peers(address: str, token: str) -> dict[str, fpb.Peer]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await fpb_grpc.PeerServiceStub(channel).ListPeers(fpb.ListPeersRequest(), metadata=bearer(token))
    return {p.registry_url: p for p in reply.peers}


async def test_declared_peers_are_applied_and_updated(mesh_factory: MeshFactory, tmp_path: Path) -> None:
    peers_file = tmp_path / "peers.json"
    declare(peers_file, "Official Partner Registry")
    handle = mesh_factory(
        services=SERVICES[:1],
        name="declared",
        env={"FEDERATION_PEERS_FILE": str(peers_file), "PARTNER_TOKEN": TOKEN},
    )
    peers = await list_peers(handle.address("registry"), handle.admin_token)
    partner = peers["https://partner.example"]
    assert partner.name == "Official Partner Registry" and partner.require_mtls and partner.is_active
    assert peers["https://rest.example"].protocol == fpb.PEER_PROTOCOL_REST

    conn = await asyncpg.connect(handle.database_url)
    try:
        stored = [dict(r) for r in await conn.fetch("SELECT * FROM federation_peers")]
    finally:
        await conn.close()
    assert len(stored) == 2 and all(TOKEN not in str(r) and "plain-file-token" not in str(r) for r in stored)

    # An admin disables one; a restart with an edited file renames it but does not re-enable it or duplicate it.
    async with grpc.aio.insecure_channel(handle.address("registry")) as channel:
        await fpb_grpc.PeerServiceStub(channel).UpdatePeer(
            fpb.UpdatePeerRequest(peer=fpb.Peer(id=partner.id, is_active=False)), metadata=bearer(handle.admin_token)
        )
    declare(peers_file, "Renamed Partner")
    handle.mesh.stop_service("registry")
    handle.mesh.start_service("registry")
    peers = await list_peers(handle.address("registry"), handle.admin_token)
    assert len(peers) == 2
    renamed = peers["https://partner.example"]
    assert renamed.id == partner.id and renamed.name == "Renamed Partner" and not renamed.is_active


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps([{"name": "x", "url": "https://x.example", "api_key_env": "MISSING_VAR"}]), "MISSING_VAR"),
        (json.dumps([{"name": "x", "url": "ftp://x.example", "api_key": "k"}]), "peer.registry_url"),
        (json.dumps([{"name": "x", "url": "https://x.example", "api_key": "k", "colour": "red"}]), "unknown keys"),
    ],
)
def test_bad_declared_peers_file_stops_start_with_a_clear_error(
    mesh_factory: MeshFactory, tmp_path: Path, content: str, message: str
) -> None:
    peers_file = tmp_path / "peers.json"
    peers_file.write_text(content)
    with pytest.raises(RuntimeError) as err:
        mesh_factory(services=SERVICES[:1], name="badpeers", env={"FEDERATION_PEERS_FILE": str(peers_file)})
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)
