"""The bounds of PolicyService's requests, in one place for the registry that checks them and the edge's document."""

from __future__ import annotations

from agentvault.common.policy.request import CLIENT_TYPE

MAX_NAME = 200
MAX_DESCRIPTION = 2000
MAX_FIELD = 500  # each id and attribute of an Explain request
MAX_ITEMS = 64  # an Explain caller's scopes, a target's tags
# Explain's time override: epoch seconds up to the end of year 9999, what the engine's UTC calendar can read.
MAX_TIME = 253_402_300_799
# Explain's caller kinds and the engine's entity types; "" means client (a caller from outside any mesh).
CALLER_TYPES = {
    "person": "Caller::Person",
    "agent": "Caller::Agent",
    "service": "Caller::Service",
    "peer": "Caller::Peer",
    "client": CLIENT_TYPE,
}

# Permission requests, approvals, grants and connections (the registry's access RPCs).
MAX_PURPOSE = 2000
MAX_NOTE = 500  # an approver's note, a trust change's reason
MAX_DURATION = 30 * 86400  # a grant's lifetime, seconds
DEFAULT_DURATION = 3600
MAX_WAIT = 60  # how long RequestCapability may wait for an approval's answer, seconds
MAX_CALLS = 1_000_000  # a grant's uses
CAPABILITY_KINDS = ("tool", "skill", "model")
APPROVAL_STATUSES = ("pending", "approved", "denied", "expired")
