"""Domain errors raised by handlers, and their mapping to gRPC status with google.rpc details (AIP-193)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "agentvault.io"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path in the request (e.g. `agent.capabilities[0].version`) and why."""

    field: str
    description: str


@dataclass
class AgentVaultError(Exception):
    """Base of every error a handler raises on purpose; the interceptor turns it into a status."""

    message: str
    reason: str = "INTERNAL"
    metadata: Mapping[str, str] = field(default_factory=dict)
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata))
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> grpc.Status:
        proto = status_pb2.Status(
            code=self.code.value[0],
            message=self.message,
            details=self.details(),
        )
        return rpc_status.to_status(proto)


class InvalidArgument(AgentVaultError):
    """The request is malformed; carries every field violation found, not just the first."""

    def __init__(self, violations: Iterable[FieldViolation], message: str | None = None) -> None:
        self.violations = list(violations)
        summary = message or "; ".join(f"{v.field}: {v.description}" for v in self.violations[:5])
        super().__init__(summary or "invalid request", "INVALID_ARGUMENT", {}, grpc.StatusCode.INVALID_ARGUMENT)

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [*super().details(), packed]


class _CodedError(AgentVaultError):
    """An error whose status code is fixed by its class; keyword arguments become ErrorInfo metadata."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, reason: str | None = None, **metadata: str) -> None:
        super().__init__(message, reason or self.default_reason, metadata, self.status_code)


class NotFound(_CodedError):
    status_code, default_reason = grpc.StatusCode.NOT_FOUND, "NOT_FOUND"


class AlreadyExists(_CodedError):
    status_code, default_reason = grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"


class PermissionDenied(_CodedError):
    status_code, default_reason = grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"


class Unauthenticated(_CodedError):
    status_code, default_reason = grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"


class FailedPrecondition(_CodedError):
    status_code, default_reason = grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"


class Unavailable(_CodedError):
    status_code, default_reason = grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"


class DeadlineExceeded(_CodedError):
    status_code, default_reason = grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"


class ResourceExhausted(_CodedError):
    status_code, default_reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"


class Aborted(_CodedError):
    status_code, default_reason = grpc.StatusCode.ABORTED, "ABORTED"


class RateLimited(ResourceExhausted):
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when to try again (the edge's Retry-After)."""

    def __init__(self, message: str, reason: str, retry_after_seconds: int, **metadata: str) -> None:
        super().__init__(message, reason, **metadata, retry_after_seconds=str(retry_after_seconds))
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=self.retry_after_seconds)))
        return [*super().details(), packed]


def invalid(field_path: str, description: str) -> InvalidArgument:
    """Shorthand for a single field violation."""
    return InvalidArgument([FieldViolation(field_path, description)])


STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


def store_unavailable(store: str) -> Unavailable:
    """A store (PostgreSQL or Redis) did not answer: UNAVAILABLE (HTTP 503) with a reason a client can act on."""
    name = "database" if store == "postgres" else store.capitalize()
    return Unavailable(f"the {name} is unavailable; retry later", STORE_UNAVAILABLE, store=store)


def from_store_error(exc: BaseException) -> AgentVaultError | None:
    """Maps store errors (asyncpg, redis-py) by class, never by message text; None when not a known kind."""
    return from_database_error(exc) or from_redis_error(exc)


def from_redis_error(exc: BaseException) -> AgentVaultError | None:
    from redis import exceptions as redis_errors

    # ConnectionError covers refused and dropped connections and a server still loading its data.
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return store_unavailable("redis")
    return None


def from_database_error(exc: BaseException) -> AgentVaultError | None:
    """Maps asyncpg errors by class, never by message text; None when the error is not a known kind."""
    import asyncpg
    from asyncpg import exceptions as pg_errors

    if isinstance(exc, asyncpg.UniqueViolationError):
        constraint = getattr(exc, "constraint_name", "") or ""
        return AlreadyExists("a resource with the same unique key already exists", constraint=constraint)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return FailedPrecondition("a referenced resource does not exist", "REFERENCE_MISSING")
    if isinstance(exc, asyncpg.CheckViolationError | asyncpg.StringDataRightTruncationError):
        return InvalidArgument([FieldViolation("", "value rejected by the database constraints")])
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError  # class 08: the connection failed or was lost
        | asyncpg.CannotConnectNowError  # starting up or recovering
        | asyncpg.AdminShutdownError  # shutting down
        | asyncpg.CrashShutdownError  # a backend crashed and the server is resetting
        | asyncpg.TooManyConnectionsError
        | ConnectionError
        | OSError,  # TimeoutError included: the database did not answer in time
    ):
        return store_unavailable("postgres")
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(
        exc, ValueError | pg_errors.UnsupportedClientFeatureError | pg_errors.UnsupportedServerFeatureError
    ):
        # A connection left unusable by an outage: closed under the caller, or still busy with the statement
        # an aborted call began ("another operation is in progress"). The client-side argument errors
        # (asyncpg's DataError, a ValueError) are bugs and stay INTERNAL.
        return store_unavailable("postgres")
    if isinstance(exc, pg_errors.InternalClientError):
        # The client's protocol state after the server vanished mid-statement ("cannot switch to state 15; another
        # operation is in progress", seen when PostgreSQL was SIGKILLed under load): an outage, not a bug.
        return store_unavailable("postgres")
    if isinstance(exc, asyncpg.SerializationError | asyncpg.DeadlockDetectedError):
        return Aborted("the transaction conflicted with another; retry", "TRANSACTION_CONFLICT")
    return None


def status_code_name(code: int) -> str:
    return code_pb2.Code.Name(code)
