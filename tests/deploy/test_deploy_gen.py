"""Deployment files come from the one service list (scripts/deploy_gen.py): no drift, and a new entry is enough."""

from __future__ import annotations

import importlib.util
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from agentvault.common.services import SERVICES, ServiceSpec, service

from .test_deploy_files import (
    K8S_VERSIONS,
    REQUIRED_ENV,
    ROOT,
    _compose_binary,
    _compose_env,
    _kubectl_binary,
    _objects,
    _run,
    _validate,
)


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_gen", ROOT / "scripts" / "deploy_gen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()

# A service the list does not have yet, as its author would add it: one entry.
SESSIONS = ServiceSpec(
    "sessions",
    "agentvault_sessions",
    "SESSIONS_PORT",
    50056,
    proto_services=("agentvault.sessions.v1.SessionService",),
    calls=("registry",),
    summary="session handoff",
)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("pyproject.toml", "docker-compose.yml", "Dockerfile"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "deploy", root / "deploy")
    return root


def test_the_checked_in_files_match_the_service_list() -> None:
    stale = gen.drift()
    assert not stale, f"run `make deploy`: {[str(p.relative_to(ROOT)) for p in stale]} drifted from the service list"


def test_a_hand_edit_of_a_generated_file_is_drift(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    assert gen.drift(root) == []
    path = root / "deploy" / "k8s" / "base" / "discovery.yaml"
    path.write_text(path.read_text().replace('value: "50052"', 'value: "50099"'))
    compose = root / "docker-compose.yml"
    compose.write_text(compose.read_text().replace('DISCOVERY_PORT: "50052"', 'DISCOVERY_PORT: "1"'))
    assert set(gen.drift(root)) == {path, compose}
    gen.write(root)
    assert gen.drift(root) == []


def test_a_changed_entry_changes_every_file(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    moved = tuple(replace(s, default_port=50062) if s.name == "discovery" else s for s in SERVICES)
    written = set(gen.write(root, moved))
    base = root / "deploy" / "k8s" / "base"
    assert written == {root / "docker-compose.yml", base / "discovery.yaml", base / "kustomization.yaml"}
    assert "DISCOVERY_ADDR=discovery:50062" in (base / "kustomization.yaml").read_text()


def test_a_new_service_is_one_entry(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    services = (*SERVICES[:-1], SESSIONS, replace(service("edge"), calls=(*service("edge").calls, "sessions")))
    gen.write(root, services)

    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["agentvault-sessions"] == "agentvault_sessions.__main__:main"
    assert set(scripts) >= {s.script for s in SERVICES}

    # Compose: valid, with the service wired like its siblings.
    result = _run(
        [_compose_binary(), "--project-directory", root, "-f", root / "docker-compose.yml", "config"],
        env=_compose_env(tmp_path, **REQUIRED_ENV),
    )
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    sessions = model["sessions"]
    assert sessions["command"] == ["agentvault-sessions"]
    assert sessions["environment"]["SESSIONS_PORT"] == "50056"
    assert sessions["environment"]["REGISTRY_ADDR"] == "registry:50051"
    assert "DATABASE_URL" in sessions["environment"]
    assert sessions["depends_on"]["registry"]["condition"] == "service_healthy"
    assert model["edge"]["environment"]["SESSIONS_ADDR"] == "sessions:50056"

    # Kubernetes: the base renders, validates strictly, and holds the new service's objects and ADDR.
    rendered = _run([_kubectl_binary(), "kustomize", root / "deploy" / "k8s" / "base"])
    assert rendered.returncode == 0, rendered.stderr
    objects = _objects(rendered.stdout)
    kinds = {o["kind"] for o in objects if o["metadata"]["name"] == "sessions"}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    assert config["SESSIONS_ADDR"] == "sessions:50056"
    result = _validate(tmp_path, rendered.stdout, K8S_VERSIONS[-1])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("spec", SERVICES, ids=lambda s: s.name)
def test_the_dev_server_runs_what_the_list_names(spec: ServiceSpec) -> None:
    # `python -m <module>` is how the dev server starts it, and the entry point compose and Kubernetes run.
    assert importlib.util.find_spec(f"{spec.module}.__main__") is not None


def test_released_services_keep_their_names_ports_and_variables() -> None:
    # Operators' configs name these; a new service adds to the list, an existing one never moves.
    released = {
        "registry": ("agentvault_registry", "REGISTRY_PORT", 50051, "REGISTRY_ADDR", "agentvault-registry"),
        "discovery": ("agentvault_discovery", "DISCOVERY_PORT", 50052, "DISCOVERY_ADDR", "agentvault-discovery"),
        "health-monitor": (
            "agentvault_healthmonitor",
            "HEALTH_MONITOR_PORT",
            50053,
            "HEALTH_MONITOR_ADDR",
            "agentvault-health-monitor",
        ),
        "edge": ("agentvault_edge", "EDGE_PORT", 8080, "EDGE_ADDR", "agentvault-edge"),
    }
    current = {s.name: (s.module, s.port_var, s.default_port, s.addr_var, s.script) for s in SERVICES}
    assert {name: current.get(name) for name in released} == released
    # Start order (dev server, compose): every service after the ones it calls.
    order = [s.name for s in SERVICES]
    for spec in SERVICES:
        assert all(order.index(called) < order.index(spec.name) for called in spec.calls), spec.name
