"""Mutual TLS between meshes: B serves its federation API on a TLS listener that demands a client certificate
from the mesh's CA; A, holding one, finds B's agents; a mesh without one cannot even connect."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agentvault.devserver.embedded import free_port
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc

from ..conftest import MeshFactory, MeshHandle, unique_did
from .conftest import admin, call, mesh_env


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    server: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(root: Path) -> Pki:
    ca_key = _key()
    ca = _cert("agentvault test CA", ca_key, None, ca_key, ca=True, server=False)
    server_key, client_key = _key(), _key()
    server = _cert("mesh-b", server_key, ca, ca_key, ca=False, server=True)
    client = _cert("mesh-a", client_key, ca, ca_key, ca=False, server=True)
    rogue_ca_key = _key()
    rogue_ca = _cert("someone else's CA", rogue_ca_key, None, rogue_ca_key, ca=True, server=False)
    rogue_key = _key()
    rogue = _cert("mesh-x", rogue_key, rogue_ca, rogue_ca_key, ca=False, server=True)
    pem = serialization.Encoding.PEM
    return Pki(
        ca=_write(root / "ca.pem", ca.public_bytes(pem)),
        server_cert=_write(root / "server.pem", server.public_bytes(pem)),
        server_key=_write(root / "server.key", _pem_key(server_key)),
        client_cert=_write(root / "client.pem", client.public_bytes(pem)),
        client_key=_write(root / "client.key", _pem_key(client_key)),
        rogue_cert=_write(root / "rogue.pem", rogue.public_bytes(pem)),
        rogue_key=_write(root / "rogue.key", _pem_key(rogue_key)),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_meshes(mesh_factory: MeshFactory, pki: Pki) -> tuple[MeshHandle, MeshHandle, int]:
    tls_port, b_edge = free_port(), free_port()
    b = mesh_factory(
        name="mtls_b",
        env=mesh_env(
            "mesh-b-tls",
            # Its own edge's URL, which the invitations it issues name (test_invitation_over_mutual_tls).
            EDGE_PORT=str(b_edge),
            FEDERATION_PUBLIC_URL=f"http://127.0.0.1:{b_edge}",
            FEDERATION_TLS_CA=str(pki.ca),
            FEDERATION_TLS_CERT=str(pki.server_cert),
            FEDERATION_TLS_KEY=str(pki.server_key),
            FEDERATION_TLS_PORT=str(tls_port),
        ),
    )
    a = mesh_factory(
        name="mtls_a",
        env=mesh_env(
            "mesh-a-tls",
            FEDERATION_TLS_CA=str(pki.ca),
            FEDERATION_TLS_CERT=str(pki.client_cert),
            FEDERATION_TLS_KEY=str(pki.client_key),
            FEDERATION_TLS_PORT=str(free_port()),
            FEDERATION_HEALTH_CHECK_INTERVAL="3600",
        ),
    )
    return a, b, tls_port


async def test_peer_over_mutual_tls(
    http: aiohttp.ClientSession, tls_meshes: tuple[MeshHandle, MeshHandle, int]
) -> None:
    a, b, tls_port = tls_meshes
    doc = await call(http, "GET", b.url("/.well-known/agentvault-federation"))
    assert doc["mtls_required"] is True and doc["grpc_endpoint"] == f"127.0.0.1:{tls_port}"

    word = "mtlsword" + unique_did()[-6:].replace("-", "")
    agent = {"did": unique_did(), "name": f"{word} agent", "version": "1.0.0", "sharing": "federated"}
    await call(http, "POST", b.url("/api/v1/agents"), headers=admin(b), json=agent)
    token = (
        await call(http, "POST", b.url("/api/v1/federation/credentials"), headers=admin(b), json={"name": "mesh-a"})
    )["token"]
    await call(
        http,
        "POST",
        a.url("/api/v1/federation/peers"),
        headers=admin(a),
        json={"name": "B over mTLS", "registry_url": b.url(), "api_key": token},
    )
    found = await call(
        http,
        "GET",
        a.url("/api/v1/discovery/agents"),
        headers=admin(a),
        params={"include_federated": "true", "search": word, "force_refresh": "true"},
    )
    stats = found["federation_stats"]
    assert stats["successful_queries"] == 1, stats
    assert [x["name"] for x in found["agents"] if x["is_federated"]] == [f"{word} agent"]


async def test_tls_listener_refuses_clients_without_the_mesh_certificate(
    tls_meshes: tuple[MeshHandle, MeshHandle, int], pki: Pki
) -> None:
    _, _, tls_port = tls_meshes
    target = f"127.0.0.1:{tls_port}"
    request = fpb.GetFederationInfoRequest()
    # With the right client certificate the listener answers.
    good = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    async with grpc.aio.secure_channel(target, good) as channel:
        info = await fpb_grpc.FederationServiceStub(channel).GetFederationInfo(request, timeout=10)
    assert info.mtls_required
    for creds in (
        grpc.ssl_channel_credentials(pki.ca.read_bytes()),  # no client certificate
        grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.rogue_key.read_bytes(), pki.rogue_cert.read_bytes()),
    ):
        async with grpc.aio.secure_channel(target, creds) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fpb_grpc.FederationServiceStub(channel).GetFederationInfo(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mesh_without_certificates_reports_why(
    http: aiohttp.ClientSession, mesh_factory: MeshFactory, tls_meshes: tuple[MeshHandle, MeshHandle, int]
) -> None:
    _, b, _ = tls_meshes
    plain = mesh_factory(name="mtls_plain", env=mesh_env("mesh-plain", FEDERATION_HEALTH_CHECK_INTERVAL="3600"))
    token = (
        await call(http, "POST", b.url("/api/v1/federation/credentials"), headers=admin(b), json={"name": "plain"})
    )["token"]
    await call(
        http,
        "POST",
        plain.url("/api/v1/federation/peers"),
        headers=admin(plain),
        json={"name": "B over mTLS", "registry_url": b.url(), "api_key": token},
    )
    url = plain.url("/api/v1/discovery/agents")
    found = await call(http, "GET", url, headers=admin(plain), params={"include_federated": "true"})
    peer = found["federation_stats"]["peers"][0]
    assert found["federation_stats"]["failed_queries"] == 1
    # The why is for admins; anyone else gets the generic reason.
    assert "TLS" in peer["error"] or "tls" in peer["error"].lower(), peer
    anonymous = await call(http, "GET", url, params={"include_federated": "true"})
    assert anonymous["federation_stats"]["peers"][0]["error"] == "unavailable"


async def test_invitation_over_mutual_tls(
    http: aiohttp.ClientSession, tls_meshes: tuple[MeshHandle, MeshHandle, int]
) -> None:
    """A redeems B's invitation on B's TLS listener, presenting the mesh certificate, and then finds B's agents with
    the agreed token. (Last here: A drops the hand-made peer for B of the first test.)"""
    a, b, _ = tls_meshes
    for peer in (await call(http, "GET", a.url("/api/v1/federation/peers"), headers=admin(a)))["peers"]:
        await call(http, "DELETE", a.url(f"/api/v1/federation/peers/{peer['id']}"), headers=admin(a))
    word = "mtlsinv" + unique_did()[-6:].replace("-", "")
    agent = {"did": unique_did(), "name": f"{word} agent", "version": "1.0.0", "sharing": "federated"}
    await call(http, "POST", b.url("/api/v1/agents"), headers=admin(b), json=agent)
    code = (
        await call(http, "POST", b.url("/api/v1/federation/invitations"), headers=admin(b), json={"name": "mesh-a"})
    )["code"]
    peer = await call(
        http, "POST", a.url("/api/v1/federation/peers"), headers=admin(a), json={"name": "B", "invitation": code}
    )
    assert peer["registry_url"] == b.url()
    found = await call(
        http,
        "GET",
        a.url("/api/v1/discovery/agents"),
        headers=admin(a),
        params={"include_federated": "true", "search": word, "force_refresh": "true"},
    )
    assert [x["name"] for x in found["agents"] if x["is_federated"]] == [f"{word} agent"], found["federation_stats"]
