"""The one list of the mesh's services: the dev server, entry points and deployment files are all made from it.

Adding a service is one entry here, a small `__main__` on `agentvault.common.server.run_service`, and `make deploy`
(scripts/deploy_gen.py), which writes pyproject's lists, docker-compose.yml and the Kubernetes base from this list;
`make lint` and tests/deploy fail when those files have drifted from it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        ),
        publish_var="REGISTRY_HOST_PORT",
        summary="agents, API keys, federation peers and the peer-facing FederationService",
    ),
    ServiceSpec(
        "discovery",
        "agentvault_discovery",
        "DISCOVERY_PORT",
        50052,
        proto_services=("agentvault.discovery.v1.DiscoveryService",),
        calls=("registry",),
        summary="the discovery aggregator: local search through the registry plus the federated fan-out to peers",
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
    ),
    ServiceSpec(
        "edge",
        "agentvault_edge",
        "EDGE_PORT",
        8080,
        kind=HTTP,
        calls=("registry", "discovery", "health-monitor"),
        publish_var="EDGE_HOST_PORT",
        max_replicas=10,
        summary="the HTTP/JSON front door, serving /api/v1/..., /healthz, /readyz and /metrics on one port",
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
