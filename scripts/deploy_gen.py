"""Writes the deployment files from the one service list (or, with --check, fails when any of them has drifted).

From `agentvault.common.services.SERVICES` it makes: pyproject.toml's entry points and its two package lists,
the AgentVault services of docker-compose.yml, one Kubernetes file per service under deploy/k8s/base (from
deploy/templates/), and the base kustomization's resources and *_ADDR settings. Hand-written text outside the
marked regions (postgres, redis, shared settings, overlays) is left alone.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from agentvault.common.services import GRPC, SECRET_VAR, SECRETS_VAR, SERVICES, ServiceSpec

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = "pyproject.toml"
COMPOSE = "docker-compose.yml"
K8S_BASE = "deploy/k8s/base"
KUSTOMIZATION = f"{K8S_BASE}/kustomization.yaml"
TEMPLATES = "deploy/templates"
BEGIN, END = "# deploy_gen:begin {}", "# deploy_gen:end {}"
# Entry points that are not services (the CLI, the dev server) stay in the list, always first.
OTHER_SCRIPTS = {"agentvault": "agentvault.client.cli:main"}
LAST_SCRIPTS = {"agentvault-dev": "agentvault.devserver.__main__:main"}
FEDERATION_SERVICE = "agentvault.federation.v1.FederationService"
ADMIN_TOKEN_VAR = "AGENTVAULT_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret
# Kubernetes Secrets the overlays supply besides agentvault-secrets (stores and keys, every backend): the
# bootstrap admin token (the registry only) and one per service identity (that service and the registry).
ADMIN_SECRET = "agentvault-admin"  # noqa: S105 - a Secret's name
# The console's sessions (the edge only): CONSOLE_REDIS_URL and CONSOLE_SESSION_KEY.
CONSOLE_SECRET = "agentvault-console"  # noqa: S105 - a Secret's name
CONSOLE_KEY_VAR = "CONSOLE_SESSION_KEY"
# In compose, a Redis database of their own: nothing of the backends' keys is in reach of the edge's.
CONSOLE_REDIS_URL = "redis://redis:6379/1"


def identity_secret(spec: ServiceSpec) -> str:
    """The Kubernetes Secret holding a service's own client secret (key SERVICE_CLIENT_SECRET)."""
    return f"agentvault-{spec.name}-identity"


def secret_var(spec: ServiceSpec) -> str:
    """The variable holding a service's client secret in compose's .env and in the registry's pod."""
    return f"{spec.env_prefix}_CLIENT_SECRET"


def _identities(services: Sequence[ServiceSpec]) -> list[ServiceSpec]:
    return [s for s in services if s.scopes]


def _quoted(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def _replace_region(text: str, region: str, body: str, path: str) -> str:
    begin, end = BEGIN.format(region), END.format(region)
    pattern = re.compile(rf"(?P<indent>[ \t]*){re.escape(begin)}\n.*?{re.escape(end)}", re.S)
    match = pattern.search(text)
    if match is None:
        raise SystemExit(f"{path}: the markers '{begin}' ... '{end}' are missing")
    indent = match.group("indent")
    block = f"{indent}{begin}\n{body}{indent}{end}"
    return text[: match.start()] + block + text[match.end() :]


# ---------------------------------------------------------------- pyproject


def pyproject(text: str, services: Sequence[ServiceSpec]) -> str:
    scripts = {**OTHER_SCRIPTS, **{s.script: s.entry_point for s in services}, **LAST_SCRIPTS}
    body = "".join(f'{name} = "{target}"\n' for name, target in scripts.items())
    text = _replace_region(text, "scripts", body, PYPROJECT)
    packages = _quoted(["agentvault", *(s.module for s in services)])
    text = _replace_region(text, "first-party", f"known-first-party = {packages}\n", PYPROJECT)
    return _replace_region(text, "packages", f"packages = {packages}\n", PYPROJECT)


# ---------------------------------------------------------------- docker compose


def _callers(spec: ServiceSpec, services: Sequence[ServiceSpec]) -> list[str]:
    return [s.name for s in services if spec.name in s.calls]


def _compose_service(spec: ServiceSpec, services: Sequence[ServiceSpec]) -> str:
    by_name = {s.name: s for s in services}
    port = spec.default_port
    lines = [f"  # {spec.name}: {spec.summary}."]
    lines += [f"  {spec.name}:", "    <<: *agentvault-service", f'    command: ["{spec.script}"]', "    environment:"]
    if spec.has_stores:
        lines.append("      <<: [*agentvault-env, *agentvault-secrets, *federation-env]")
    else:
        lines.append("      <<: *agentvault-env")
    lines.append(f'      {spec.port_var}: "{port}"')
    lines += [f"      {by_name[c].addr_var}: {c}:{by_name[c].default_port}" for c in spec.calls]
    lines += _compose_secrets(spec, services)
    if spec.metrics_port_var:
        lines.append(f'      {spec.metrics_port_var}: "9090"')
    if spec.publish_var:
        published = f"${{AGENTVAULT_PUBLISH_ADDR:-127.0.0.1}}:${{{spec.publish_var}:-{port}}}:{port}"
        lines += ["    ports:", f'      - "{published}"']
    if spec.metrics_port_var:
        lines += ["    expose:", '      - "9090"']
    lines.append("    depends_on:")
    if spec.has_stores:
        for store in ("postgres", "redis"):
            lines += [f"      {store}:", "        condition: service_healthy"]
    elif spec.console_sessions:
        lines += ["      redis:", "        condition: service_healthy"]
    for called in spec.calls:
        lines += [f"      {called}:", "        condition: service_healthy"]
    lines += ["    healthcheck:"]
    if spec.kind == GRPC:
        lines.append(f'      test: ["CMD", "python", "-m", "agentvault.common.healthcheck", "127.0.0.1:{port}"]')
    else:
        probe = (
            "import sys, urllib.request; "
            f"sys.exit(urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=3).status != 200)"
        )
        lines += ["      test:", "        - CMD", "        - python", "        - -c", f'        - "{probe}"']
    lines += ["      interval: 10s", "      timeout: 5s", "      retries: 3"]
    if spec.has_stores:
        lines.append("      # Migrations run before the server starts listening.")
    lines.append(f"      start_period: {'60s' if spec.has_stores else '20s'}")
    return "\n".join(lines) + "\n"


def _required(var: str, what: str) -> str:
    return f"${{{var}:?set {var} (e.g. in .env) to {what}, see the top of docker-compose.yml}}"


def _compose_secrets(spec: ServiceSpec, services: Sequence[ServiceSpec]) -> list[str]:
    """Each service only its own secret; the registry, the authorization server, every service's and the
    bootstrap admin token (for people)."""
    random = "a long random secret"
    if spec.authorization_server:
        items = ",".join(f"{s.name}={_required(secret_var(s), random)}" for s in _identities(services))
        return [
            "      # The bootstrap admin token, for people; no service calls another with it.",
            f"      {ADMIN_TOKEN_VAR}: {_required(ADMIN_TOKEN_VAR, random)}",
            "      # The authorization server upserts each service's OAuth client (secrets kept hashed).",
            f"      {SECRETS_VAR}: {items}",
        ]
    if spec.console_sessions:
        return [
            "      # The console's sign-in sessions: Redis, and the key encrypting the credentials they hold.",
            f"      CONSOLE_REDIS_URL: {CONSOLE_REDIS_URL}",
            f"      {CONSOLE_KEY_VAR}: {_required(CONSOLE_KEY_VAR, random)}",
        ]
    if spec.scopes:
        return [
            f"      # Its own OAuth client ({spec.client_id}: {' '.join(spec.scopes)}); no other service's secret.",
            f"      {SECRET_VAR}: {_required(secret_var(spec), random)}",
        ]
    return []


def compose(text: str, services: Sequence[ServiceSpec]) -> str:
    body = "\n".join(_compose_service(s, services) for s in services)
    return _replace_region(text, "services", body, COMPOSE)


# ---------------------------------------------------------------- kubernetes


def _ingress_note(spec: ServiceSpec, services: Sequence[ServiceSpec]) -> str:
    callers = ", ".join(_callers(spec, services)) or "none today"
    note = [f"    # gRPC only from the mesh's own pods in this namespace (callers: {callers})."]
    if FEDERATION_SERVICE in spec.proto_services:
        note += [
            "    # Peer meshes call FederationService on this port at FEDERATION_PUBLIC_GRPC_ENDPOINT, but this port",
            "    # also carries its other services and reflection, in plaintext, and a NetworkPolicy cannot tell them",
            "    # apart: it is not opened to the outside here. An overlay that exposes federation adds a rule for the",
            '    # proxy that does (README, "Federation").',
        ]
    return "\n".join(note)


def k8s_file(spec: ServiceSpec, services: Sequence[ServiceSpec], root: Path) -> str:
    template = (root / TEMPLATES / ("grpc-backend.yaml" if spec.kind == GRPC else "http-gateway.yaml")).read_text()
    by_name = {s.name: s for s in services}
    values = {
        "name": spec.name,
        "summary": spec.summary,
        "protos": ", ".join(name.rsplit(".", 1)[-1] for name in spec.proto_services),
        "port": str(spec.default_port),
        "PORT_VAR": spec.port_var,
        "METRICS_VAR": spec.metrics_port_var,
        "script": spec.script,
        "max_replicas": str(spec.max_replicas),
        "ingress_note": _ingress_note(spec, services),
        "ADDR_VARS": ", ".join(by_name[c].addr_var for c in spec.calls),
        "secret_env": _k8s_secret_env(spec, services),
        "secret_refs": _k8s_secret_refs(spec),
    }
    return re.sub(r"@([A-Za-z_]+)@", lambda m: values[m.group(1)], template)


def _k8s_secret_env(spec: ServiceSpec, services: Sequence[ServiceSpec]) -> str:
    """The registry's list of service secrets, each read from that service's own Secret (one copy of each)."""
    if not spec.authorization_server:
        return ""
    lines = []
    for other in _identities(services):
        lines += [
            f"            - name: {secret_var(other)}",
            "              valueFrom:",
            "                secretKeyRef:",
            f"                  name: {identity_secret(other)}",
            f"                  key: {SECRET_VAR}",
        ]
    items = ",".join(f"{s.name}=$({secret_var(s)})" for s in _identities(services))
    lines += [
        "            # The authorization server upserts each service's OAuth client from these (kept hashed).",
        f"            - name: {SECRETS_VAR}",
        f'              value: "{items}"',
    ]
    return "\n".join(lines) + "\n"


def _k8s_secret_refs(spec: ServiceSpec) -> str:
    if spec.authorization_server:
        return (
            "\n".join(
                [
                    "            # AGENTVAULT_ADMIN_TOKEN, the bootstrap admin token: for people, the registry only.",
                    "            - secretRef:",
                    f"                name: {ADMIN_SECRET}",
                ]
            )
            + "\n"
        )
    if spec.console_sessions:
        return (
            "\n".join(
                [
                    "            # CONSOLE_REDIS_URL and CONSOLE_SESSION_KEY, the console's sign-in sessions, only.",
                    "            - secretRef:",
                    f"                name: {CONSOLE_SECRET}",
                ]
            )
            + "\n"
        )
    if spec.scopes:
        return (
            "\n".join(
                [
                    f"            # SERVICE_CLIENT_SECRET of its own OAuth client ({spec.client_id}) only.",
                    "            - secretRef:",
                    f"                name: {identity_secret(spec)}",
                ]
            )
            + "\n"
        )
    return ""


def kustomization(text: str, services: Sequence[ServiceSpec]) -> str:
    resources = "".join(f"  - {s.name}.yaml\n" for s in services)
    text = _replace_region(text, "resources", resources, KUSTOMIZATION)
    addrs = "".join(f"      - {s.addr_var}={s.name}:{s.default_port}\n" for s in services if _callers(s, services))
    return _replace_region(text, "addrs", addrs, KUSTOMIZATION)


def outputs(root: Path = ROOT, services: Sequence[ServiceSpec] = SERVICES) -> dict[Path, str]:
    """Each generated file under `root` with the text the service list makes for it."""

    def current(path: str) -> str:
        return (root / path).read_text()

    files = {
        root / PYPROJECT: pyproject(current(PYPROJECT), services),
        root / COMPOSE: compose(current(COMPOSE), services),
        root / KUSTOMIZATION: kustomization(current(KUSTOMIZATION), services),
    }
    for spec in services:
        files[root / K8S_BASE / f"{spec.name}.yaml"] = k8s_file(spec, services, root)
    return files


def drift(root: Path = ROOT, services: Sequence[ServiceSpec] = SERVICES) -> list[Path]:
    """The generated files whose contents differ from what the service list makes."""
    return [path for path, text in outputs(root, services).items() if not path.exists() or path.read_text() != text]


def write(root: Path = ROOT, services: Sequence[ServiceSpec] = SERVICES) -> list[Path]:
    """Writes every generated file that differs; returns those written."""
    written = []
    for path, text in outputs(root, services).items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if any generated file is out of date")
    args = parser.parse_args()
    if args.check:
        stale = drift()
        if stale:
            names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
            print(f"out of date with agentvault.common.services: {names}; run `make deploy`", file=sys.stderr)
            return 1
        return 0
    for path in write():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
