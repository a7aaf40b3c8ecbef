"""Health observations as plain data, and the rules that turn checks into state: thresholds and overall status."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
ERROR = "error"
STATUSES = (HEALTHY, UNHEALTHY, TIMEOUT, UNREACHABLE, ERROR)

PEER = "peer"
AGENT = "agent"

MAX_ERROR = 500


@dataclass(frozen=True)
class CheckResult:
    """What one check saw."""

    status: str
    response_time_ms: float
    error: str = ""
    # Peers only: the agent count the peer reported, when it answered.
    agent_count: int | None = None
    # Peers only, after a success through a route learned from the peer's discovery document (its record left
    # protocol or endpoint unset): how it was reached (federation.v1.PeerProtocol) and its gRPC endpoint.
    learned_protocol: int = 0
    learned_grpc_endpoint: str = ""

    @property
    def ok(self) -> bool:
        return self.status == HEALTHY

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        # Errors come from remote answers and exception text; keep them bounded in rows and events.
        if len(self.error) > MAX_ERROR:
            object.__setattr__(self, "error", self.error[: MAX_ERROR - 1] + "…")


@dataclass(frozen=True)
class State:
    """A subject's latest state; `status` is "" before its first check."""

    subject_kind: str
    subject_id: str
    name: str = ""
    status: str = ""
    response_time_ms: float = 0.0
    error: str = ""
    consecutive_failures: int = 0
    is_down: bool = False
    agent_count: int | None = None
    last_check: datetime | None = None
    last_success: datetime | None = None


def apply_check(previous: State, result: CheckResult, checked_at: datetime, threshold: int, name: str) -> State:
    """The state after a check: down only after `threshold` consecutive failures, up after one success."""
    if result.ok:
        failures = 0
        is_down = False
        last_success: datetime | None = checked_at
    else:
        failures = previous.consecutive_failures + 1
        # Once down, a subject stays down until a success, whatever the threshold is changed to meanwhile.
        is_down = previous.is_down or failures >= threshold
        last_success = previous.last_success
    return replace(
        previous,
        name=name or previous.name,
        status=result.status,
        response_time_ms=result.response_time_ms,
        error=result.error,
        consecutive_failures=failures,
        is_down=is_down,
        agent_count=result.agent_count if result.agent_count is not None else previous.agent_count,
        last_check=checked_at,
        last_success=last_success,
    )


def is_change(before: State, after: State) -> bool:
    """Whether watchers hear about it: a new status, or the subject going down or coming back."""
    return before.status != after.status or before.is_down != after.is_down


def overall_status(states: list[State]) -> str:
    """ "" with no peers; healthy when every peer's last check succeeded, down only when every peer is down (past
    the failure threshold, as each peer's is_down says), else degraded: a failure below the threshold degrades."""
    if not states:
        return ""
    if all(s.status == HEALTHY for s in states):
        return "healthy"
    if all(s.is_down for s in states):
        return "down"
    return "degraded"


@dataclass(frozen=True)
class Summary:
    """Uptime over a window: share of healthy checks, and mean response time of those."""

    checks: int
    healthy: int
    avg_response_time_ms: float

    @property
    def uptime_percent(self) -> float:
        return 100.0 * self.healthy / self.checks if self.checks else 0.0


@dataclass(frozen=True)
class HistoryEntry:
    status: str
    response_time_ms: float
    error: str
    checked_at: datetime


@dataclass(frozen=True)
class PeerSubject:
    """An active peer as the checker needs it."""

    id: str
    name: str
    registry_url: str
    protocol: int  # federation.v1.PeerProtocol
    grpc_endpoint: str
    require_mtls: bool


@dataclass(frozen=True)
class AgentSubject:
    """An agent that declares a health-check URL, with the health the registry currently shows for it."""

    id: str
    name: str
    url: str
    registry_health: int  # registry.v1.HealthStatus
    # Whether the mesh authenticates to it (registry.v1.AgentAuthKind; 0 and NONE: no), and the registration's
    # version (its update time): resolved credentials are reused while it stays the same.
    auth_kind: int = 0
    version: str = ""
