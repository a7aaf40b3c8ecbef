"""Domain errors raised by handlers, and their mapping to gRPC status with google.rpc details (AIP-193)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
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


class ResourceExhausted(_CodedError):
    status_code, default_reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"


class Aborted(_CodedError):
    status_code, default_reason = grpc.StatusCode.ABORTED, "ABORTED"


def invalid(field_path: str, description: str) -> InvalidArgument:
    """Shorthand for a single field violation."""
    return InvalidArgument([FieldViolation(field_path, description)])


def from_database_error(exc: BaseException) -> AgentVaultError | None:
    """Maps asyncpg errors by class, never by message text; None when the error is not a known kind."""
    import asyncpg

    if isinstance(exc, asyncpg.UniqueViolationError):
        constraint = getattr(exc, "constraint_name", "") or ""
        return AlreadyExists("a resource with the same unique key already exists", constraint=constraint)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return FailedPrecondition("a referenced resource does not exist", "REFERENCE_MISSING")
    if isinstance(exc, asyncpg.CheckViolationError | asyncpg.StringDataRightTruncationError):
        return InvalidArgument([FieldViolation("", "value rejected by the database constraints")])
    if isinstance(
        exc,
        asyncpg.CannotConnectNowError
        | asyncpg.ConnectionDoesNotExistError
        | asyncpg.TooManyConnectionsError
        | ConnectionError
        | OSError,
    ):
        return Unavailable("the database is unavailable", "DATABASE_UNAVAILABLE")
    if isinstance(exc, asyncpg.SerializationError | asyncpg.DeadlockDetectedError):
        return Aborted("the transaction conflicted with another; retry", "TRANSACTION_CONFLICT")
    return None


def status_code_name(code: int) -> str:
    return code_pb2.Code.Name(code)
