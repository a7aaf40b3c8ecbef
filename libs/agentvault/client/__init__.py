"""Typed asyncio client for the AgentVault registry, and the `agentvault` command-line tool built on it."""

from agentvault.client.convert import (
    build_agent,
    capability,
    endpoint,
    enum_number,
    enum_word,
    from_dict,
    parse_capability,
    parse_endpoint,
    to_dict,
)
from agentvault.client.errors import (
    AlreadyExistsError,
    ClientError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from agentvault.client.registry import IDEMPOTENT_METHODS, AgentFilters, RegistryClient, RetryPolicy

__all__ = [
    "IDEMPOTENT_METHODS",
    "AgentFilters",
    "AlreadyExistsError",
    "ClientError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RegistryClient",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "build_agent",
    "capability",
    "endpoint",
    "enum_number",
    "enum_word",
    "from_dict",
    "parse_capability",
    "parse_endpoint",
    "to_dict",
]
