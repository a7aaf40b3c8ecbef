"""Typed asyncio clients for an AgentVault mesh (registry, policies, federation, discovery, messaging) and its CLI."""

from agentvault.client.base import GrpcClient, RetryPolicy
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
from agentvault.client.discovery import DiscoveryClient, DiscoveryFilters
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
from agentvault.client.federation import FederationClient
from agentvault.client.identity import IdentityClient
from agentvault.client.messaging import MessagingClient
from agentvault.client.policy import Explanation, PolicyClient
from agentvault.client.registry import IDEMPOTENT_METHODS, AgentFilters, RegistryClient

__all__ = [
    "IDEMPOTENT_METHODS",
    "AgentFilters",
    "AlreadyExistsError",
    "ClientError",
    "DeadlineExceededError",
    "DiscoveryClient",
    "DiscoveryFilters",
    "Explanation",
    "FailedPreconditionError",
    "FederationClient",
    "FieldViolation",
    "GrpcClient",
    "IdentityClient",
    "InvalidArgumentError",
    "MessagingClient",
    "NotFoundError",
    "PermissionDeniedError",
    "PolicyClient",
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
