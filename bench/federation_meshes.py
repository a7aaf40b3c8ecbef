"""The federation bench's meshes: their environment, the agents seeded in the peers, and the peering between them."""

from __future__ import annotations

import hashlib
import itertools
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.mesh import Mesh
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from bench.federation_net import DelayProxies

QUERY = "summarize"


def vocabulary(queries: int) -> tuple[str, ...]:
    """Enough words for `queries` distinct pairs. Each is `q`, three letters and `x`: one length, so none is a
    prefix of another (the registry matches prefixes), and no English suffix the stemmer would strip."""
    size = 8
    while size * (size - 1) // 2 < queries:
        size += 1
    letters = "abcdefghijklmnopqrstuvwxyz"
    return tuple(f"q{a}{b}{c}x" for a, b, c in itertools.islice(itertools.product(letters, repeat=3), size))


def carries(word: str, agent: int) -> bool:
    """Whether agent number `agent` (of every peer) carries `word`: a fixed coin toss per pair."""
    return hashlib.blake2b(f"{word}/{agent}".encode(), digest_size=1).digest()[0] < 128


class ColdQueries:
    """Queries never asked before in the run: each a pair of vocabulary words, which every federated agent
    carrying both matches (about a quarter of them, a different quarter per pair). One instance serves every
    client, so no peer ever sees a query twice, whichever aggregator asks."""

    def __init__(self, words: tuple[str, ...]) -> None:
        self._pairs = itertools.combinations(words, 2)

    def next(self) -> str:
        pair = next(self._pairs, None)
        if pair is None:
            raise RuntimeError("the cold vocabulary is exhausted: size it for more calls")
        return " ".join(pair)


@dataclass
class Node:
    """One mesh: its processes, its admin token and (for aggregators) its discovery metrics URL."""

    name: str
    mesh: Mesh
    token: str
    metrics_url: str = ""

    @property
    def auth(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)

    def pid(self, service: str) -> int:
        return self.mesh.processes[service].pid


def mesh_env(name: str, dsn: str, redis_url: str, data: Path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "REDIS_URL": redis_url,
        "AGENTVAULT_ADMIN_TOKEN": "bench-admin-" + secrets.token_urlsafe(16),
        "AGENTVAULT_DATA_DIR": str(data),
        "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
        "FEDERATION_REGISTRY_NAME": name,
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


async def create_databases(admin_dsn: str, names: list[str]) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def seed(node: Node, peer_number: int, count: int, words: tuple[str, ...]) -> None:
    """`count` federated agents matching QUERY and carrying their half of `words`, plus a few local ones that must
    never leave the mesh."""
    with grpc.insecure_channel(node.mesh.address("registry")) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        for i in range(count + 5):
            federated = i < count
            agent = pb.Agent(
                did=f"did:web:peer{peer_number}.bench.example:agent-{i}",
                name=f"Summarizer {i} of peer {peer_number}" if federated else f"Local helper {i}",
                description=(
                    f"Agents that summarize documents, meetings and threads; variant {i} of mesh {peer_number}; "
                    + " ".join(w for w in words if carries(w, i))
                    if federated
                    else f"A local summarize helper {i} kept inside mesh {peer_number}"
                ),
                version=f"1.{i % 7}.{i % 3}",
                agent_type="nlp",
                tags=["nlp", "text", f"peer-{peer_number}"],
                capabilities=[
                    pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name="summarize", version=f"1.{i % 5}.0"),
                    pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="search", version="2.0.0"),
                ],
                endpoints=[
                    pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=f"https://peer{peer_number}.bench.example/agents/{i}")
                ],
                sharing=pb.SHARING_FEDERATED if federated else pb.SHARING_LOCAL,
            )
            stub.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=node.auth, timeout=30)


def issue_credential(issuer: Node, for_name: str) -> str:
    with grpc.insecure_channel(issuer.mesh.address("registry")) as channel:
        reply = fed_grpc.PeerServiceStub(channel).CreateFederationCredential(
            fed_pb.CreateFederationCredentialRequest(name=for_name), metadata=issuer.auth, timeout=30
        )
    return str(reply.token)


def add_peer(on: Node, name: str, endpoint: str, api_key: str, protocol: str = "grpc") -> str:
    """Adds a peer with its protocol given, so no discovery document (and no edge) is needed."""
    if protocol == "grpc":
        peer = fed_pb.Peer(
            name=name,
            registry_url=f"http://{endpoint}",
            api_key=api_key,
            protocol=fed_pb.PEER_PROTOCOL_GRPC,
            grpc_endpoint=endpoint,
        )
    else:
        peer = fed_pb.Peer(
            name=name, registry_url=f"http://{endpoint}", api_key=api_key, protocol=fed_pb.PEER_PROTOCOL_REST
        )
    with grpc.insecure_channel(on.mesh.address("registry")) as channel:
        created = fed_grpc.PeerServiceStub(channel).CreatePeer(
            fed_pb.CreatePeerRequest(peer=peer), metadata=on.auth, timeout=30
        )
    return str(created.id)


def set_active(on: Node, peer_id: str, active: bool) -> None:
    with grpc.insecure_channel(on.mesh.address("registry")) as channel:
        fed_grpc.PeerServiceStub(channel).UpdatePeer(
            fed_pb.UpdatePeerRequest(
                peer=fed_pb.Peer(id=peer_id, is_active=active), update_mask=FieldMask(paths=["is_active"])
            ),
            metadata=on.auth,
            timeout=30,
        )


@dataclass
class SilentPeers:
    """Registers the silent server on A as a REST peer, or as a gRPC peer, one at a time."""

    on: Node
    rest_port: int
    grpc_port: int
    ids: dict[str, str] = field(default_factory=dict)

    def add_rest(self) -> str:
        self.ids["silent-rest"] = add_peer(
            self.on, "silent-rest", f"127.0.0.1:{self.rest_port}", "bench-silent-peer-token", protocol="rest"
        )
        return "silent-rest"

    def swap_to_grpc(self) -> str:
        set_active(self.on, self.ids["silent-rest"], False)
        self.ids["silent-grpc"] = add_peer(
            self.on, "silent-grpc", f"127.0.0.1:{self.grpc_port}", "bench-silent-peer-token"
        )
        return "silent-grpc"


@dataclass
class Peering:
    """Every peer as A and A1 know it, so the bench can move them behind the delay proxies."""

    a: Node
    a1: Node
    endpoints: list[str]  # each peer registry's gRPC address
    tokens_a: list[str]  # the credential each peer issued to A
    token_a1: str  # the one peer-0 issued to A1
    ids_a: list[str] = field(default_factory=list)
    id_a1: str = ""

    def behind_proxies(self, proxies: DelayProxies, silent: SilentPeers) -> set[str]:
        """Deactivates the direct peers (and the silent one) and adds each peer again behind a delay proxy."""
        for peer_id in [*self.ids_a, *silent.ids.values()]:
            set_active(self.a, peer_id, False)
        set_active(self.a1, self.id_a1, False)
        names = set()
        for i, (endpoint, token) in enumerate(zip(self.endpoints, self.tokens_a, strict=True)):
            proxied = proxies.add(endpoint)
            add_peer(self.a, f"wan-peer-{i}", proxied, token)
            if i == 0:
                add_peer(self.a1, "wan-peer-0", proxied, self.token_a1)
            names.add(f"wan-peer-{i}")
        return names
