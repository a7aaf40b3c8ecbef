"""Client test fixtures: a mesh of registry and discovery (the client talks gRPC, so no edge), a registry-only peer
mesh for federated searches, clients, and the real `agentvault` executable."""

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
REGISTRY_AND_DISCOVERY = tuple(s for s in SERVICES if s.name in ("registry", "discovery"))
# The console script pip installed next to this interpreter; `python -m` when running from a bare checkout.
_SCRIPT = Path(sys.executable).with_name("agentvault")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "agentvault.client.cli"]

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def client_mesh(mesh_factory: MeshFactory) -> MeshHandle:
    return mesh_factory(services=REGISTRY_AND_DISCOVERY, name="client", keep=True)


@pytest.fixture(scope="session")
def peer_mesh(mesh_factory: MeshFactory) -> MeshHandle:
    """A second mesh the client mesh federates with, for `discover --include-federated`."""
    return mesh_factory(services=REGISTRY_ONLY, name="client_peer", keep=True)


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

    def run(
        *args: str, token: str | None = None, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`env` overrides the mesh's variables (REGISTRY_ADDR, DISCOVERY_ADDR) or adds others."""
        variables = {
            "REGISTRY_ADDR": client_mesh.address("registry"),
            "DISCOVERY_ADDR": client_mesh.address("discovery"),
            "AGENTVAULT_TOKEN": client_mesh.admin_token if token is None else token,
            **(env or {}),
        }
        environ = {k: v for k, v in os.environ.items() if k not in variables} | variables
        return subprocess.run(
            [*CLI, *args], input=stdin, capture_output=True, text=True, env=environ, timeout=60, check=False
        )

    return run
