"""Client test fixtures: a registry-only mesh (the client talks gRPC, so the edge is not needed) and clients."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agentvault.client import RegistryClient
from agentvault.devserver.mesh import SERVICES
from tests.conftest import MeshFactory, MeshHandle

REGISTRY_ONLY = tuple(s for s in SERVICES if s.name == "registry")
# The console script pip installed next to this interpreter; `python -m` when running from a bare checkout.
_SCRIPT = Path(sys.executable).with_name("agentvault")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "agentvault.client.cli"]

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def client_mesh(mesh_factory: MeshFactory) -> MeshHandle:
    return mesh_factory(services=REGISTRY_ONLY, name="client")


@pytest.fixture(scope="session")
async def admin(client_mesh: MeshHandle) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(client_mesh.address("registry"), token=client_mesh.admin_token) as client:
        yield client


@pytest.fixture(scope="session")
async def anonymous(client_mesh: MeshHandle) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(client_mesh.address("registry"), token="") as client:
        yield client


@pytest.fixture(scope="session")
def cli(client_mesh: MeshHandle) -> Cli:
    """Runs the real `agentvault` executable against the client mesh, as an admin unless told otherwise."""

    def run(*args: str, token: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("AGENTVAULT_TOKEN", "REGISTRY_ADDR")}
        env["REGISTRY_ADDR"] = client_mesh.address("registry")
        env["AGENTVAULT_TOKEN"] = client_mesh.admin_token if token is None else token
        return subprocess.run(
            [*CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
        )

    return run
