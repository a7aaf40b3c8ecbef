"""The mesh's policy engine (issue 11): Cedar policies, allow / deny / ask decisions, grants and explanations."""

from agentvault.common.policy.engine import Decision, Explanation, Grant, Outcome, PolicyEngine
from agentvault.common.policy.request import (
    Caller,
    Target,
    Trust,
    agent_target,
    caller,
    capability_target,
    external_client,
    tool_target,
)
from agentvault.common.policy.schema import ACTIONS, SCHEMA_TEXT, PolicyError, validate

__all__ = [
    "ACTIONS",
    "SCHEMA_TEXT",
    "Caller",
    "Decision",
    "Explanation",
    "Grant",
    "Outcome",
    "PolicyEngine",
    "PolicyError",
    "Target",
    "Trust",
    "agent_target",
    "caller",
    "capability_target",
    "external_client",
    "tool_target",
    "validate",
]
