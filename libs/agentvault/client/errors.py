"""Typed client errors: a failed call's status code, message and google.rpc details (ErrorInfo, BadRequest)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, as the server named it (e.g. `agent.capabilities[0].version`)."""

    field: str
    description: str


@dataclass(eq=False)  # exceptions compare and hash by identity
class ClientError(Exception):
    """A call that did not succeed. `reason` and `domain` come from google.rpc.ErrorInfo when the server sent it."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: list[FieldViolation] = field(default_factory=list)
    request_id: str = ""
    # True when the call never reached the server (refused, unresolvable, or down until the deadline).
    unreachable: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason and self.reason != self.code.name else ""
        return f"{self.code.name}: {self.message}{reason}"


class InvalidArgumentError(ClientError):
    """The request was rejected as malformed; `field_violations` names every offending field."""


class NotFoundError(ClientError):
    pass


class AlreadyExistsError(ClientError):
    pass


class PermissionDeniedError(ClientError):
    pass


class UnauthenticatedError(ClientError):
    pass


class FailedPreconditionError(ClientError):
    pass


class UnavailableError(ClientError):
    """The server could not be reached or asked to be retried later; safe to retry idempotent calls."""


class DeadlineExceededError(ClientError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(exc: grpc.aio.AioRpcError, request_id: str = "") -> ClientError:
    """The typed error for a failed call, with the details the server packed into grpc-status-details-bin."""
    code = exc.code()
    message = exc.details() or code.name.lower().replace("_", " ")
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details inconsistent with the status line: keep the status line, drop the details
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    cls = _BY_CODE.get(code, ClientError)
    return cls(code, message, reason, domain, metadata, violations, request_id)
