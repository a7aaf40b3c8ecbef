"""What asking one peer came to: its status, the generic reason anyone may see and the detail only admins see."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentvault.common.peers import PeerTarget
from agentvault.registry.v1 import registry_service_pb2 as pb

MAX_ERROR_TEXT = 300

OK, FAILED, TIMEOUT, SKIPPED = "ok", "failed", "timeout", "skipped"
# What callers who are not admins see of why a peer failed: never an address or a peer's own words.
REASON_TIMEOUT = "timeout"
REASON_UNAVAILABLE = "unavailable"
REASON_INVALID = "invalid answer"
REASON_REJECTED = "rejected"
REASON_DOWN = "down"
REASON_INTERNAL = "internal error"


class PeerError(Exception):
    """Why one peer's answer was not used: a short generic `reason` anyone may see, and a `detail` (addresses,
    the peer's own error text) for admins and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class PeerOutcome:
    peer: PeerTarget
    status: str
    latency_ms: float = 0.0
    from_cache: bool = False
    agents: list[pb.Agent] = field(default_factory=list)
    # The generic reason (see REASON_*) and the full story, empty when the peer answered.
    reason: str = ""
    error: str = ""
    invalid: int = 0
    # Identifies the exact validated answer (a digest of its serialized form), so work derived from it (scores)
    # can be reused; None when the peer did not answer.
    version: bytes | None = None
    # What the validated answer costs in memory, for memos built from it.
    weight: int = 0


def short(text: str) -> str:
    """A peer's error text on one line, at most MAX_ERROR_TEXT characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"
