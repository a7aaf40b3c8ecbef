"""Which HTTP request headers reach the backends as gRPC metadata, checked so that gRPC never refuses them."""

from __future__ import annotations

from aiohttp import web

from agentvault.common import tracing
from agentvault.common.logs import request_id_var
from agentvault_edge import errors

# The only request headers forwarded to backends, as lowercase gRPC metadata. Anything else a client sends
# stays at the edge, so a client cannot forge metadata the services trust (e.g. x-http-method).
FORWARDED_HEADERS: tuple[str, ...] = (
    "authorization",
    "x-request-id",
    "x-federation-registry",
    "x-federation-signature",
    "x-federation-timestamp",
    "x-federation-nonce",
    "traceparent",
    "tracestate",
)
SIGNATURE_HEADER = "x-federation-signature"
# What HTTP/2 (and so gRPC's metadata limit) counts for each entry on top of its name and value (RFC 7541).
METADATA_ENTRY_OVERHEAD = 32


def is_metadata_text(value: str) -> bool:
    # gRPC refuses non-printable or non-ASCII values in text metadata; reject them here with a 400.
    return all(" " <= ch <= "~" for ch in value)


def forwarded_metadata(request: web.Request, raw_body: bytes, limit: int) -> list[tuple[str, str | bytes]]:
    """The gRPC metadata for a request: its request id, the allowed headers and, when signed, what was signed."""
    metadata: list[tuple[str, str | bytes]] = [("x-request-id", request_id_var.get())]
    for name in FORWARDED_HEADERS:
        if name == "x-request-id":
            continue
        for value in request.headers.getall(name, ()):
            if not is_metadata_text(value):
                raise errors.bad_request(name, "header value must be printable ASCII")
            metadata.append((name, value))
    if SIGNATURE_HEADER in request.headers:
        # The backend verifies the HMAC over exactly what the client signed: method, path as sent, body.
        metadata.append(("x-http-method", request.method))
        metadata.append(("x-http-path", request.raw_path))
        metadata.append(("x-http-body-bin", raw_body))
    size = sum(len(key) + len(value) + METADATA_ENTRY_OVERHEAD for key, value in metadata)
    if size > limit:
        # Past gRPC's own limit the backend would refuse the call with its internals in the text.
        signed = " (a signed request's body counts too)" if SIGNATURE_HEADER in request.headers else ""
        raise errors.headers_too_large(f"the forwarded headers take {size} bytes, more than {limit}{signed}")
    # The edge's own span (when spans are recorded) becomes the backend's parent instead of the client's.
    return tracing.replace_trace_headers(metadata)
