"""HTTP error bodies: gRPC status to HTTP status (grpc-gateway's mapping) and edge-side request errors."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentvault.common.errors import DOMAIN
from agentvault_edge.json_out import any_to_json, message_to_json

log = logging.getLogger(__name__)

# grpc-gateway's runtime.HTTPStatusFromCode, so clients of either gateway see the same statuses.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class EdgeError(Exception):
    """An error answered as `{"error": {...}}`; `details` are google.rpc messages, packed on output."""

    def __init__(
        self,
        http_status: int,
        grpc_code: grpc.StatusCode,
        message_text: str,
        details: list[message.Message] | None = None,
        headers: dict[str, str] | None = None,
        *,
        close_connection: bool = False,
    ) -> None:
        super().__init__(message_text)
        self.http_status = http_status
        self.grpc_code = grpc_code
        self.message = message_text
        self.details: list[message.Message] = list(details or ())
        self.headers = dict(headers or {})
        # Answered with `Connection: close`: the rest of the request (or the connection) cannot be trusted.
        self.close_connection = close_connection

    def body(self) -> dict[str, Any]:
        details = []
        for detail in self.details:
            if isinstance(detail, any_pb2.Any):
                details.append(any_to_json(detail))
            else:
                details.append(
                    {"@type": f"type.googleapis.com/{detail.DESCRIPTOR.full_name}", **message_to_json(detail)}
                )
        return {
            "error": {
                "code": self.http_status,
                "status": self.grpc_code.name,
                "message": self.message,
                "details": details,
            }
        }


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


def bad_request(field: str, description: str, *, http_status: int = 400) -> EdgeError:
    """A request the edge rejects before calling a backend, naming the offending field."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    text = f"{field}: {description}" if field else description
    return EdgeError(
        http_status,
        grpc.StatusCode.INVALID_ARGUMENT,
        text,
        [_error_info("INVALID_ARGUMENT"), error_details_pb2.BadRequest(field_violations=[violation])],
    )


def not_found(path: str) -> EdgeError:
    return EdgeError(404, grpc.StatusCode.NOT_FOUND, f"no route for {path}", [_error_info("ROUTE_NOT_FOUND")])


def method_not_allowed(method: str, allowed: list[str]) -> EdgeError:
    return EdgeError(
        405,
        grpc.StatusCode.UNIMPLEMENTED,
        f"method {method} is not allowed here; allowed: {', '.join(allowed)}",
        [_error_info("METHOD_NOT_ALLOWED", allowed=",".join(allowed))],
        headers={"Allow": ", ".join(allowed)},
    )


def body_too_large(limit: int) -> EdgeError:
    return EdgeError(
        413,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"request body exceeds {limit} bytes",
        [_error_info("BODY_TOO_LARGE", limit=str(limit))],
    )


def headers_too_large(description: str) -> EdgeError:
    return EdgeError(
        431,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request headers too large: {description}",
        [_error_info("HEADERS_TOO_LARGE")],
        close_connection=True,
    )


def header_timeout(seconds: float) -> EdgeError:
    return EdgeError(
        408,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the request head was not received within {seconds:g} s",
        [_error_info("HEADER_TIMEOUT", seconds=f"{seconds:g}")],
        close_connection=True,
    )


def body_timeout(seconds: float) -> EdgeError:
    return EdgeError(
        408,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the request body was not received within {seconds:g} s",
        [_error_info("BODY_TIMEOUT", seconds=f"{seconds:g}")],
        close_connection=True,
    )


def too_many_connections(limit: int) -> EdgeError:
    return EdgeError(
        503,
        grpc.StatusCode.UNAVAILABLE,
        f"the edge has more than {limit} connections open; retry shortly",
        [_error_info("TOO_MANY_CONNECTIONS", limit=str(limit))],
        headers={"Retry-After": "1"},
        close_connection=True,
    )


def shutting_down() -> EdgeError:
    return EdgeError(
        503,
        grpc.StatusCode.UNAVAILABLE,
        "the edge is shutting down; retry on a new connection",
        [_error_info("SHUTTING_DOWN")],
        headers={"Retry-After": "1"},
        close_connection=True,
    )


def unsupported_media_type(content_type: str) -> EdgeError:
    return EdgeError(
        415,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request bodies must be application/json, got {content_type}",
        [_error_info("UNSUPPORTED_MEDIA_TYPE")],
    )


def from_rpc_error(exc: grpc.aio.AioRpcError, service: str) -> EdgeError:
    """Maps a failed call, with the google.rpc details the backend put in `grpc-status-details-bin`."""
    code = exc.code()
    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        # The trailer disagrees with the status line; trust the status line and drop the details.
        status = None
    details: list[message.Message] = list(status.details) if status is not None else []
    text = exc.details() or code.name.lower()
    if status is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # Raised by the channel, not the service: the raw text names internal addresses, so log it only.
        log.warning("%s call failed: %s %s", service, code.name, exc.details())
        if code is grpc.StatusCode.UNAVAILABLE:
            text = f"{service} is unavailable"
        else:
            text = f"{service} did not answer in time"
        details = [_error_info("BACKEND_UNAVAILABLE" if code is grpc.StatusCode.UNAVAILABLE else "TIMEOUT")]
    elif status is None and code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL):
        # A gRPC transport limit (metadata or message size), not a service's answer: its text is gRPC's
        # internals, so it goes to the log and the client gets the request id to quote.
        log.warning("%s call failed in transport: %s %s", service, code.name, exc.details())
        text = f"the call to {service} failed in transport ({code.name.lower()}); see the edge log"
        details = [_error_info("TRANSPORT_LIMIT" if code is grpc.StatusCode.RESOURCE_EXHAUSTED else "INTERNAL")]
    http_status = HTTP_STATUS.get(code, 500)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and any(r.endswith("_TOO_LARGE") for r in _reasons(details)):
        # Too big, not too many: retrying the same request cannot help, so not 429 (which invites a retry).
        http_status = 413
    return EdgeError(http_status, code, text, details, headers=_retry_after(details))


def _reasons(details: list[message.Message]) -> list[str]:
    """The google.rpc.ErrorInfo reasons among a service's details."""
    found = []
    for detail in details:
        if isinstance(detail, any_pb2.Any) and detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.append(info.reason)
    return found


def _retry_after(details: list[message.Message]) -> dict[str, str] | None:
    """A service's google.rpc.RetryInfo, as the Retry-After header an HTTP client acts on (whole seconds, up)."""
    for detail in details:
        if isinstance(detail, any_pb2.Any) and detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            seconds = info.retry_delay.seconds + (1 if info.retry_delay.nanos > 0 else 0)
            return {"Retry-After": str(max(1, seconds))}
    return None


def internal(request_id: str) -> EdgeError:
    return EdgeError(
        500, grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})", [_error_info("INTERNAL")]
    )
