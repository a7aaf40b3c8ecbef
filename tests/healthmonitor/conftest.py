"""Mesh A (monitored), a healthy mesh B, and hand-made bad peers on loopback: refused, silent, 500, flapping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
from aiohttp import web

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES
from agentvault.healthmonitor.v1 import health_monitor_service_pb2_grpc as hm_grpc

from ..conftest import MeshFactory, MeshHandle

T = TypeVar("T")

INTERVAL = 1.0
THRESHOLD = 2
CHECK_TIMEOUT = 0.5
# Generous: the assertions are about what happens, never how fast; these only bound a broken run.
DEADLINE = 30.0


def monitor_env() -> dict[str, str]:
    return {
        "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
        "FEDERATION_HEALTH_CHECK_INTERVAL": str(INTERVAL),
        "FEDERATION_UNHEALTHY_THRESHOLD": str(THRESHOLD),
        "HEALTH_CHECK_TIMEOUT": str(CHECK_TIMEOUT),
        "HEALTH_MONITOR_METRICS_PORT": str(free_port()),
        "HEALTH_MONITOR_REPLICA_ID": "replica-1",
    }


def admin(handle: MeshHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {handle.admin_token}"}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, *, headers: dict[str, str], json: Any = None, expect: int = 200
) -> Any:
    async with http.request(method, url, headers=headers, json=json) as response:
        body = await response.json(content_type=None)
        assert response.status == expect, f"{method} {url} -> {response.status}: {body}"
        return body


async def until(
    fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, deadline: float = DEADLINE
) -> T:
    """Fetches until `done(value)`; fails with the last value seen after `deadline` (a bound, not a criterion)."""
    end = time.monotonic() + deadline
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}; last seen: {value!r}")
        await asyncio.sleep(0.1)


class FakePeer:
    """An aiohttp server answering the REST health endpoint (and an agent health URL) as told to.

    No discovery document is served, so the monitor treats it as a REST peer.
    """

    def __init__(self, status: int = 200, agent_count: int = 3) -> None:
        self.status = status
        self.agent_count = agent_count
        # Answers queued ahead of `status`, e.g. [500] fails exactly the next request.
        self.next_statuses: list[int] = []
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _health(self, request: web.Request) -> web.Response:
        self.requests += 1
        status = self.next_statuses.pop(0) if self.next_statuses else self.status
        if status != 200:
            return web.json_response({"status": "unhealthy"}, status=status)
        return web.json_response({"status": "healthy", "agent_count": self.agent_count})

    async def start(self) -> FakePeer:
        app = web.Application()
        app.router.add_get("/api/v1/health", self._health)
        app.router.add_get("/agent/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class SilentPeer:
    """Accepts TCP connections and never says a word: the monitor must give up at its deadline."""

    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> SilentPeer:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            with contextlib.suppress(ConnectionError):
                await reader.read()  # until the client gives up and closes

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()


@dataclass
class Peers:
    """Peer ids on mesh A, by role."""

    a: MeshHandle
    b: MeshHandle
    healthy: str
    refused: str
    silent: str
    failing: str
    flapping: str
    flapper: FakePeer
    failer: FakePeer
    agent_server: FakePeer
    refused_url: str

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.a.env['HEALTH_MONITOR_METRICS_PORT']}/metrics"


@pytest.fixture(scope="package")
def mesh_a(mesh_factory: MeshFactory) -> MeshHandle:
    assert any(s.name == "health-monitor" for s in SERVICES)
    return mesh_factory(env={**monitor_env(), "FEDERATION_REGISTRY_NAME": "mesh-a"}, name="hm_a", keep=True)


@pytest.fixture(scope="package")
def mesh_b(mesh_factory: MeshFactory) -> MeshHandle:
    return mesh_factory(env={"FEDERATION_REGISTRY_NAME": "mesh-b"}, name="hm_b", keep=True)


async def add_peer(http: aiohttp.ClientSession, on: MeshHandle, name: str, url: str) -> str:
    body = await call(
        http,
        "POST",
        on.url("/api/v1/federation/peers"),
        headers=admin(on),
        json={"name": name, "registry_url": url, "api_key": "token-issued-to-a"},
    )
    return str(body["id"])


@pytest.fixture(scope="package")
async def peers(mesh_a: MeshHandle, mesh_b: MeshHandle, http: aiohttp.ClientSession) -> AsyncIterator[Peers]:
    flapper = await FakePeer().start()
    failer = await FakePeer(status=500).start()
    agent_server = await FakePeer().start()
    silent = await SilentPeer().start()
    refused_url = f"http://127.0.0.1:{free_port()}"
    try:
        yield Peers(
            a=mesh_a,
            b=mesh_b,
            healthy=await add_peer(http, mesh_a, "Mesh B", mesh_b.url()),
            refused=await add_peer(http, mesh_a, "Stopped registry", refused_url),
            silent=await add_peer(http, mesh_a, "Silent registry", silent.url),
            failing=await add_peer(http, mesh_a, "Failing registry", failer.url),
            flapping=await add_peer(http, mesh_a, "Flapping registry", flapper.url),
            flapper=flapper,
            failer=failer,
            agent_server=agent_server,
            refused_url=refused_url,
        )
    finally:
        for server in (flapper, failer, agent_server, silent):
            await server.stop()


@pytest.fixture(scope="package")
async def monitor_stub(mesh_a: MeshHandle) -> AsyncIterator[hm_grpc.HealthMonitorServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh_a.address("health-monitor")) as channel:
        yield hm_grpc.HealthMonitorServiceStub(channel)


async def federation_health(http: aiohttp.ClientSession, a: MeshHandle) -> dict[str, Any]:
    return dict(await call(http, "GET", a.url("/api/v1/federation/health"), headers=admin(a)))


async def peer_entry(http: aiohttp.ClientSession, a: MeshHandle, peer_id: str) -> dict[str, Any]:
    doc = await federation_health(http, a)
    # A peer added a moment ago may not be listed yet: the monitor re-reads the peer list every few seconds.
    return next((p for p in doc["peers"] if p["peer_id"] == peer_id), {"status": "not listed", "is_down": False})


def sse_events(chunk: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in chunk.decode().splitlines() if line.startswith("data: ")]
