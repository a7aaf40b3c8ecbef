"""Test session plumbing: one real PostgreSQL and Redis for the session, and meshes of real service processes.

TEST_DATABASE_URL / TEST_REDIS_URL point the tests at existing servers instead of the embedded ones.
Each mesh gets its own database and Redis database number, so meshes never see each other's data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import EmbeddedPostgres, EmbeddedRedis
from agentvault.devserver.mesh import SERVICES, Mesh, ServiceSpec
from agentvault.registry.v1 import registry_service_pb2_grpc

# The embedded server is started with 256 databases; an external TEST_REDIS_URL needs `databases` >= this.
MAX_REDIS_DBS = 256


@dataclass
class Infra:
    admin_dsn: str
    redis_base: str
    postgres: EmbeddedPostgres | None

    def dsn(self, database: str) -> str:
        if self.postgres is not None:
            return self.postgres.uri(database)
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    # Not pytest's tmp tree: it is private to root (0700), and pgserver runs postgres as its own user.
    root = Path(tempfile.mkdtemp(prefix="agentvault-test-"))
    root.chmod(0o755)
    postgres = redis = None
    dsn = os.environ.get("TEST_DATABASE_URL")
    if not dsn:
        postgres = EmbeddedPostgres(root / "pg", delete_on_stop=True, max_connections=1000)
        dsn = postgres.start()
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        redis = EmbeddedRedis(root / "redis")
        redis_url = redis.start()
    try:
        yield Infra(dsn, redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url, postgres)
    finally:
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


_mesh_numbers = itertools.count(1)


@dataclass
class MeshHandle:
    mesh: Mesh
    database_url: str
    redis_url: str
    admin_token: str

    @property
    def env(self) -> dict[str, str]:
        return self.mesh.env

    def url(self, path: str = "") -> str:
        return self.mesh.url(path)

    def address(self, name: str) -> str:
        return self.mesh.address(name)


MeshFactory = Callable[..., MeshHandle]


# Meshes started during the current test module, stopped when it ends (_stop_the_modules_meshes).
_module_meshes: list[Mesh] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_the_modules_meshes() -> Iterator[None]:
    """Stops the meshes a module started once its tests and fixtures are done (this fixture, autouse, is set up
    before the module's own fixtures and so torn down after them): some fifty meshes of five processes each, all
    alive until the session ends, made a full run slower as it went and held gigabytes of memory."""
    yield
    while _module_meshes:
        _module_meshes.pop().stop()


@pytest.fixture(scope="session")
def mesh_factory(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshFactory]:
    """Starts a fresh mesh (own database, own Redis db, own ports) as real processes. It is stopped when the test
    module that started it ends; `keep=True` (for a session- or package-scoped fixture) keeps it to the end."""
    started: list[Mesh] = []

    def start(
        services: tuple[ServiceSpec, ...] = SERVICES,
        env: dict[str, str] | None = None,
        name: str = "mesh",
        keep: bool = False,
    ) -> MeshHandle:
        number = next(_mesh_numbers)
        if number >= MAX_REDIS_DBS:
            raise RuntimeError("too many meshes for one Redis; raise MAX_REDIS_DBS with a second server")
        database = f"{name}_{number}"

        async def create_database() -> None:
            conn = await asyncpg.connect(infra.admin_dsn)
            try:
                await conn.execute(f'CREATE DATABASE "{database}"')
            finally:
                await conn.close()

        # A thread of its own, so a mesh can also be started from inside an async fixture or test.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, create_database()).result()
        token = "test-admin-" + secrets.token_urlsafe(16)
        data_dir = tmp_path_factory.mktemp(database)
        mesh_env = {
            "DATABASE_URL": infra.dsn(database),
            "REDIS_URL": f"{infra.redis_base}/{number}",
            "AGENTVAULT_ADMIN_TOKEN": token,
            "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
            "FEDERATION_REGISTRY_NAME": database,
            "AGENTVAULT_DATA_DIR": str(data_dir),
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "INFO",
            **(env or {}),
        }
        mesh = Mesh(mesh_env, log_dir=Path(data_dir) / "logs", services=services)
        (started if keep else _module_meshes).append(mesh)
        mesh.start()
        return MeshHandle(mesh, mesh_env["DATABASE_URL"], mesh_env["REDIS_URL"], token)

    yield start
    for mesh in started + _module_meshes:
        mesh.stop()


@pytest.fixture(scope="session")
def mesh(mesh_factory: MeshFactory) -> MeshHandle:
    """The shared mesh most tests use; tests that need isolation start their own with mesh_factory."""
    return mesh_factory(name="shared", keep=True)


@pytest.fixture(scope="session")
def admin_token(mesh: MeshHandle) -> str:
    return mesh.admin_token


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def auth(token: str) -> dict[str, str]:
    """The HTTP header carrying `token`, for calls through the edge."""
    return {"Authorization": f"Bearer {token}"}


def edge_violations(answer: dict[str, Any]) -> dict[str, str]:
    """The field violations of the edge's JSON error answer: field -> description."""
    return {
        v["field"]: v["description"]
        for d in answer["error"]["details"]
        if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        for v in d["field_violations"]
    }


@pytest.fixture(scope="session")
async def registry(mesh: MeshHandle) -> AsyncIterator[registry_service_pb2_grpc.RegistryServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        yield registry_service_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def eventually(check: Callable[[], Awaitable[None]], seconds: float = 5.0) -> None:
    """Awaits `check` until it stops raising AssertionError, for at most `seconds` (then its error is raised):
    for effects that land asynchronously, like batched log rows or pub/sub invalidations."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            await check()
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def unique_did(label: str = "agent") -> str:
    return f"did:web:test.example:{label}-{secrets.token_hex(6)}"
