"""An agent whose HTTPS endpoint requires a client certificate: the health monitor presents the mesh's own
(FEDERATION_TLS_CERT/KEY) when the agent's registration says mtls, and the handshake fails without it."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, bearer, unique_did
from ..federation.test_mtls import Pki, make_pki
from ..loopback import serve
from .conftest import monitor_env, until


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("agent-pki"))


@pytest.fixture(scope="module")
def tls_mesh(mesh_factory: MeshFactory, pki: Pki) -> MeshHandle:
    # The registry and the health monitor only; the mesh's certificate is the client certificate of its checks.
    services = tuple(s for s in SERVICES if s.name in ("registry", "health-monitor"))
    return mesh_factory(
        services=services,
        name="hm_mtls",
        env={
            **monitor_env(),
            "FEDERATION_TLS_CA": str(pki.ca),
            "FEDERATION_TLS_CERT": str(pki.client_cert),
            "FEDERATION_TLS_KEY": str(pki.client_key),
            "FEDERATION_TLS_PORT": str(free_port()),
        },
    )


@pytest.fixture
async def https_agent(pki: Pki) -> AsyncIterator[str]:
    """An agent on loopback that answers only clients with a certificate from the mesh's CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", ok)
    async with serve(app, context) as port:
        yield f"https://127.0.0.1:{port}/health"


async def test_mtls_agent_is_checked_with_the_mesh_certificate(
    tls_mesh: MeshHandle, https_agent: str, pki: Pki
) -> None:
    ca_pem = Path(pki.ca).read_text()
    async with grpc.aio.insecure_channel(tls_mesh.address("registry")) as channel:
        registry = pb_grpc.RegistryServiceStub(channel)

        async def register(auth: pb.AgentAuth | None) -> str:
            agent = pb.Agent(did=unique_did(), name="TLS agent", version="1.0.0", health_check_url=https_agent)
            if auth is not None:
                agent.auth.CopyFrom(auth)
            created = await registry.CreateAgent(
                pb.CreateAgentRequest(agent=agent), metadata=bearer(tls_mesh.admin_token)
            )
            return str(created.id)

        def health(agent_id: str):  # type: ignore[no-untyped-def]
            async def fetch() -> int:
                got = await registry.GetAgent(pb.GetAgentRequest(id=agent_id), metadata=bearer(tls_mesh.admin_token))
                return int(got.health_status)

            return fetch

        with_cert = await register(pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_MTLS))
        # Trusting the agent's server certificate (its CA given as ca_pem) but presenting none: refused.
        without_cert = await register(pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token="t", ca_pem=ca_pem))
        bare = await register(None)
        await until(health(with_cert), lambda s: s == pb.HEALTH_STATUS_HEALTHY, "the mTLS agent to be healthy")
        for agent_id in (without_cert, bare):
            await until(health(agent_id), lambda s: s == pb.HEALTH_STATUS_UNHEALTHY, "a TLS failure to show")
