"""The one list of the mesh's services: the dev server, entry points and deployment files are all made from it.

Adding a service is one entry here, a small `__main__` on `agentvault.common.server.run_service`, and `make deploy`
(scripts/deploy_gen.py), which writes pyproject's lists, docker-compose.yml and the Kubernetes base from this list;
`make lint` and tests/deploy fail when those files have drifted from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agentvault.common.principal import (
    AGENTS_CONNECT,
    AGENTS_READ,
    FEDERATION_RESOLVE,
    HEALTH_REPORT,
    POLICIES_ENFORCE,
    POLICIES_READ,
    TOOLS_SYNC,
)
from agentvault.common.settings import Env, SettingsError

GRPC = "grpc"  # probed with grpc.health.v1
HTTP = "http"  # probed with GET /healthz


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # process, compose service and Kubernetes object name, e.g. "health-monitor"
    module: str  # the package under services/, run as `python -m <module>`
    port_var: str  # the variable holding its listening port (dev server: a free port when unset)
    default_port: int  # its port in containers (compose, Kubernetes) and the ADDR others are given
    kind: str = GRPC
    # Full names of the gRPC services it serves; the server refuses to start unless exactly these are registered.
    proto_services: tuple[str, ...] = ()
    # Services it calls: each gets <NAME>_ADDR=<name>:<default_port>, and compose waits until they are healthy.
    calls: tuple[str, ...] = ()
    # The host-port variable compose publishes it under (on AGENTVAULT_PUBLISH_ADDR), or "" for unpublished.
    publish_var: str = ""
    max_replicas: int = 6
    # One line for the deployment files' comments.
    summary: str = ""
    # The scopes of its own OAuth client (client_credentials, client id `svc-<name>`), with which it calls the
    # others; empty for a service that calls nobody as itself (the edge forwards its callers' credentials).
    scopes: tuple[str, ...] = ()
    # The authorization server: it holds every service client's secret (SERVICE_CLIENT_SECRETS) and recognises
    # the bootstrap admin token (for people); no other service gets either.
    authorization_server: bool = False
    # People's console sessions (the edge): a Redis (CONSOLE_REDIS_URL) and CONSOLE_SESSION_KEY from a Secret of its
    # own (agentvault-console), never the backends' database, encryption keys or service secrets.
    console_sessions: bool = False

    @property
    def client_id(self) -> str:
        """Its own OAuth client's id, or "" when it has no identity of its own."""
        return f"svc-{self.name}" if self.scopes else ""

    @property
    def env_prefix(self) -> str:
        return self.name.upper().replace("-", "_")

    @property
    def addr_var(self) -> str:
        return f"{self.env_prefix}_ADDR"

    @property
    def metrics_port_var(self) -> str:
        """Its Prometheus port variable; an HTTP service serves /metrics on its own port instead."""
        return f"{self.env_prefix}_METRICS_PORT" if self.kind == GRPC else ""

    @property
    def script(self) -> str:
        return f"agentvault-{self.name}"

    @property
    def entry_point(self) -> str:
        return f"{self.module}.__main__:main"

    @property
    def has_stores(self) -> bool:
        """gRPC backends hold PostgreSQL, Redis and the mesh's secrets; the HTTP edge holds none of them."""
        return self.kind == GRPC


# Start order: every service after the ones it calls (the dev server and compose both rely on it).
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "registry",
        "agentvault_registry",
        "REGISTRY_PORT",
        50051,
        proto_services=(
            "agentvault.registry.v1.RegistryService",
            "agentvault.federation.v1.PeerService",
            "agentvault.federation.v1.FederationService",
            "agentvault.identity.v1.IdentityService",
            "agentvault.policy.v1.PolicyService",
        ),
        publish_var="REGISTRY_HOST_PORT",
        summary="agents, API keys, federation peers and the peer-facing FederationService",
        authorization_server=True,
    ),
    ServiceSpec(
        "discovery",
        "agentvault_discovery",
        "DISCOVERY_PORT",
        50052,
        proto_services=("agentvault.discovery.v1.DiscoveryService",),
        calls=("registry",),
        summary="the discovery aggregator: local search through the registry plus the federated fan-out to peers",
        # As itself it only calls ResolvePeers (the active peers and their encrypted keys); local search and
        # GetCaller go out with the caller's own credential, never the service's.
        scopes=(FEDERATION_RESOLVE,),
    ),
    ServiceSpec(
        "health-monitor",
        "agentvault_healthmonitor",
        "HEALTH_MONITOR_PORT",
        50053,
        proto_services=("agentvault.healthmonitor.v1.HealthMonitorService",),
        calls=("registry",),
        # Each replica holds HEALTH_MONITOR_DB_POOL_SIZE (10) connections; more replicas than this rarely pay off.
        max_replicas=4,
        summary="checks peers and agents, reports to the registry; replicas share the work through PostgreSQL leases",
        # ResolvePeers (federation:resolve); ListAgents with has_health_check_url (agents:read); ReportPeerHealth,
        # ReportAgentHealth and UpdatePeer of a learned protocol/grpc_endpoint only (health:report); ResolveAgentAuth
        # to authenticate its checks to agents (agents:connect). GetCaller for its own callers goes out with their
        # credential.
        scopes=(AGENTS_READ, AGENTS_CONNECT, FEDERATION_RESOLVE, HEALTH_REPORT),
    ),
    ServiceSpec(
        "messaging",
        "agentvault_messaging",
        "MESSAGING_PORT",
        50054,
        proto_services=(
            "agentvault.messaging.v1.MessagingService",
            "agentvault.messaging.v1.ToolService",
            "agentvault.messaging.v1.FederatedMessagingService",
            "agentvault.messaging.v1.SessionService",
        ),
        calls=("registry", "discovery"),
        summary="the data plane: durable agent-to-agent messages, inboxes, delivery to external agents, dead letters",
        # GetAgent of recipients for delivery (agents:read) and their credentials (agents:connect, ResolveAgentAuth);
        # WatchPolicies (policies:read); ResolveTrust, RecordInteractions, ConsumeGrant, LogDecisions,
        # CreateApproval and every approval's answer (policies:enforce). A sender's GetAgent goes out with the
        # sender's own credential, so it sees only what the sender may.
        # ListMcpServers and SyncMcpTools (tools:sync): the MCP tool catalog, which may replace the MCP-sourced tools
        # of agents and nothing else.
        # ResolvePeers (federation:resolve): messages to and from agents of peer meshes (FederatedMessagingService).
        # Discovery's SearchAgents (ListTools with include_federated: tools of peer meshes) goes out with the
        # caller's own credential, never the service's: no scope of its own.
        scopes=(AGENTS_READ, AGENTS_CONNECT, FEDERATION_RESOLVE, POLICIES_READ, POLICIES_ENFORCE, TOOLS_SYNC),
    ),
    ServiceSpec(
        "edge",
        "agentvault_edge",
        "EDGE_PORT",
        8080,
        kind=HTTP,
        calls=("registry", "discovery", "health-monitor", "messaging"),
        publish_var="EDGE_HOST_PORT",
        max_replicas=10,
        summary="the HTTP/JSON front door, serving /api/v1/..., /console, /healthz, /readyz and /metrics on one port",
        console_sessions=True,
    ),
)


def service(name: str) -> ServiceSpec:
    for spec in SERVICES:
        if spec.name == name:
            return spec
    raise KeyError(f"no service named {name!r} in agentvault.common.services")


def service_of_module(module: str) -> ServiceSpec:
    """The spec of the package `module` (e.g. a __main__'s __package__)."""
    for spec in SERVICES:
        if spec.module == module:
            return spec
    raise KeyError(f"no service with module {module!r} in agentvault.common.services")


# A service client's secret: at least this long (secrets.token_urlsafe(32) gives 43 characters).
MIN_SECRET_LENGTH = 32
SECRETS_VAR = "SERVICE_CLIENT_SECRETS"
SECRET_VAR = "SERVICE_CLIENT_SECRET"  # noqa: S105 - a variable name, not a secret
CLIENT_ID_VAR = "SERVICE_CLIENT_ID"


def identities() -> tuple[ServiceSpec, ...]:
    """The services that call others as themselves, each with its own OAuth client."""
    return tuple(spec for spec in SERVICES if spec.scopes)


def _check_secret(var: str, name: str, secret: str) -> None:
    if len(secret) < MIN_SECRET_LENGTH:
        raise SettingsError(f"{var}: the secret of {name} must be at least {MIN_SECRET_LENGTH} characters")
    if "CHANGE-ME" in secret:
        raise SettingsError(f"{var}: the secret of {name} is still the deployment files' placeholder")
    if not secret.isprintable() or any(ch in secret for ch in " ,="):
        raise SettingsError(f"{var}: the secret of {name} must be printable, without spaces, commas or '='")


def format_service_secrets(secrets: Mapping[str, str]) -> str:
    """The SERVICE_CLIENT_SECRETS form: `discovery=<secret>,health-monitor=<secret>`."""
    return ",".join(f"{name}={secret}" for name, secret in secrets.items())


def parse_service_secrets(value: str, var: str = SECRETS_VAR) -> dict[str, str]:
    """Service name -> secret from `discovery=<secret>,health-monitor=<secret>`; SettingsError naming the
    variable (and the service, never the secret) when malformed, unknown, repeated or too short."""
    known = {spec.name for spec in identities()}
    found: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, secret = item.partition("=")
        name = name.strip()
        if not sep:
            raise SettingsError(f"{var}: each item must be <service>=<secret>, e.g. discovery=...")
        if name not in known:
            raise SettingsError(f"{var}: unknown service {name[:40]!r}; services with an identity: {sorted(known)}")
        if name in found:
            raise SettingsError(f"{var}: {name} is given twice")
        _check_secret(var, name, secret.strip())
        found[name] = secret.strip()
    return found


@dataclass(frozen=True)
class ServiceCredentials:
    """A service's own OAuth client: its id and secret, for client_credentials at the registry."""

    client_id: str
    client_secret: str

    def __repr__(self) -> str:
        # Never the secret.
        return f"ServiceCredentials(client_id={self.client_id!r})"

    @classmethod
    def load(cls, name: str, env: Env) -> ServiceCredentials:
        """SERVICE_CLIENT_ID (default `svc-<name>`) and SERVICE_CLIENT_SECRET (required) of service `name`."""
        spec = service(name)
        if not spec.scopes:
            raise KeyError(f"{name} has no identity of its own in agentvault.common.services")
        secret = env.str(SECRET_VAR, required=True).strip()
        _check_secret(SECRET_VAR, name, secret)
        return cls(env.str(CLIENT_ID_VAR, spec.client_id).strip()[:128], secret)
