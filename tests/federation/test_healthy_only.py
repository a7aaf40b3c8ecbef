"""Discovery's healthy_only filter uses the health the monitor wrote back to each agent."""

from __future__ import annotations

import aiohttp
import grpc

from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault.registry.v1 import registry_service_pb2_grpc as reg_grpc

from ..conftest import MeshHandle, unique_did
from .conftest import admin, call


async def test_healthy_only_keeps_agents_whose_last_check_passed(http: aiohttp.ClientSession, mesh: MeshHandle) -> None:
    word = "healthfilter" + unique_did()[-6:].replace("-", "")
    ids = {}
    for status in ("healthy", "unhealthy", "unknown"):
        body = {"did": unique_did(), "name": f"{word} {status}", "version": "1.0.0"}
        created = await call(http, "POST", mesh.url("/api/v1/agents"), headers=admin(mesh), json=body)
        ids[status] = created["id"]
        if status != "unknown":
            # ReportAgentHealth is internal (gRPC only, no HTTP route): called as the health monitor calls it.
            async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
                reported = await reg_grpc.RegistryServiceStub(channel).ReportAgentHealth(
                    reg_pb.ReportAgentHealthRequest(
                        id=created["id"], health_status=reg_pb.HealthStatus.Value(f"HEALTH_STATUS_{status.upper()}")
                    ),
                    metadata=[("authorization", f"Bearer {mesh.admin_token}")],
                )
            assert reported.health_status == reg_pb.HealthStatus.Value(f"HEALTH_STATUS_{status.upper()}")
    everything = await call(http, "GET", mesh.url("/api/v1/discovery/agents"), params={"search": word})
    assert {a["id"] for a in everything["agents"]} == set(ids.values())
    healthy = await call(
        http, "GET", mesh.url("/api/v1/discovery/agents"), params={"search": word, "healthy_only": "true"}
    )
    assert [a["id"] for a in healthy["agents"]] == [ids["healthy"]]
    assert healthy["agents"][0]["health_status"] == "healthy"
