"""The OAuth 2.0 endpoints (RFC 8414, 6749, 7662, 7009) at the edge: form in, the registry's RFC answer out."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import grpc
from aiohttp import web

from agentvault.common.logs import request_id_var
from agentvault.common.oauth import OAuthError
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault_edge import errors
from agentvault_edge.backends import Backends
from agentvault_edge.forwarding import is_metadata_text
from agentvault_edge.json_out import dumps
from agentvault_edge.request_body import read_body
from agentvault_edge.settings import EdgeSettings

log = logging.getLogger(__name__)

API = "identity"
METADATA_PATH = "/.well-known/oauth-authorization-server"
JWKS_PATH = "/.well-known/jwks.json"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a URL path
INTROSPECT_PATH = "/oauth/introspect"
REVOKE_PATH = "/oauth/revoke"
# The registry refuses more than this too (form plus Authorization header); here it is refused before the read ends.
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 64
FORM_TYPE = "application/x-www-form-urlencoded"
# Short: a rotated-in key is published at once, and clients that see an unknown kid refetch anyway.
JWKS_CACHE = "public, max-age=60"
METADATA_CACHE = "public, max-age=300"
# RFC 6749 5.1: token answers must not be cached; introspection and revocation answers carry token facts too.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Headers the edge sets itself; a reply's own values for these are not copied.
_OWN_HEADERS = frozenset({"content-type", "content-length", "cache-control", "pragma", "transfer-encoding"})
# RFC 6749 5.2 error codes for the edge's own refusals, by HTTP status.
_ERROR_CODES = {429: "temporarily_unavailable", 503: "temporarily_unavailable", 500: "server_error"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def oauth_error(
    error: str, description: str, status: int = 400, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps({"error": error, "error_description": description}),
        status=status,
        content_type="application/json",
        headers={**NO_STORE, **(headers or {})},
    )


def from_edge_error(exc: errors.EdgeError) -> web.Response:
    """An edge-wide refusal (body too large, shutting down, ...) on an OAuth path, in the RFC shape."""
    code = _ERROR_CODES.get(exc.http_status, "server_error" if exc.http_status >= 500 else "invalid_request")
    response = oauth_error(code, exc.message, exc.http_status, exc.headers)
    if exc.close_connection:
        response.force_close()
    return response


def unavailable() -> web.Response:
    return oauth_error(
        "temporarily_unavailable", "the authorization server cannot be reached; retry later", 503, {"Retry-After": "5"}
    )


def parse_form(request: web.Request, raw: bytes) -> dict[str, str]:
    """The form fields: application/x-www-form-urlencoded UTF-8 only, each name at most once (RFC 6749 3.1)."""
    mime, _, params = request.headers.get("Content-Type", "").partition(";")
    if mime.strip().lower() != FORM_TYPE:
        raise OAuthError("invalid_request", f"the request body must be {FORM_TYPE}")
    charset = "utf-8"
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if charset not in ("utf-8", "utf8"):
        raise OAuthError("invalid_request", "the form must be encoded in UTF-8")
    try:
        fields = parse_qsl(
            raw.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=bool(raw),
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError:  # UnicodeDecodeError included
        raise OAuthError("invalid_request", "the form is malformed, not UTF-8 or has too many fields") from None
    form: dict[str, str] = {}
    for name, value in fields:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name!r} appears more than once")
        form[name] = value
    return form


class OAuthRoutes:
    """The authorization server's HTTP face; every answer is the registry's, copied out, or an RFC-shaped refusal."""

    def __init__(self, settings: EdgeSettings, backends: Backends) -> None:
        self.settings = settings
        self.backends = backends
        # The registry serves IdentityService; an edge configured without an identity address uses the registry's.
        self.address = settings.backends.get(API) or settings.backends.get("registry")
        self._stub_cache: tuple[grpc.aio.Channel, ipb_grpc.IdentityServiceAsyncStub] | None = None
        self.routes: dict[str, tuple[str, Handler]] = {
            METADATA_PATH: ("GET", self.server_metadata),
            JWKS_PATH: ("GET", self.jwks),
            TOKEN_PATH: ("POST", self.token),
            INTROSPECT_PATH: ("POST", self.introspect),
            REVOKE_PATH: ("POST", self.revoke),
        }

    def owns(self, raw_path: str) -> bool:
        return raw_path in self.routes

    def _stub(self) -> ipb_grpc.IdentityServiceAsyncStub:
        if self.address is None:
            raise OAuthError("temporarily_unavailable", "no authorization server is configured", 503)
        # Backends keeps one channel per address; the stub is rebuilt only if that channel was replaced.
        channel = self.backends.channel(self.address)
        if self._stub_cache is None or self._stub_cache[0] is not channel:
            self._stub_cache = (channel, ipb_grpc.IdentityServiceStub(channel))
        return self._stub_cache[1]

    def _metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        # Only the request id: the Authorization header here holds client credentials, carried in the message.
        return (("x-request-id", request_id_var.get()),)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        method, handler = self.routes[request.rel_url.raw_path]
        if request.method != method:
            return oauth_error("invalid_request", f"use {method}", 405, {"Allow": method})
        try:
            return await handler(request)
        except OAuthError as exc:
            return oauth_error(exc.error, exc.description, exc.status, exc.headers)
        except errors.EdgeError as exc:  # the edge's own bounds: body size and time
            return from_edge_error(exc)
        except grpc.aio.AioRpcError as exc:
            # The registry down, slow or refusing: never its text (nor the edge's error shape) here.
            log.warning("authorization server call failed: %s", exc.code().name)
            return unavailable()

    # ----------------------------------------------------------------------------- discovery documents

    async def server_metadata(self, request: web.Request) -> web.StreamResponse:
        reply = await self._stub().GetServerMetadata(
            ipb.GetServerMetadataRequest(), timeout=self.settings.call_timeout, metadata=self._metadata()
        )
        return _document(reply.json, METADATA_CACHE)

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        reply = await self._stub().GetJwks(
            ipb.GetJwksRequest(), timeout=self.settings.call_timeout, metadata=self._metadata()
        )
        return _document(reply.json, JWKS_CACHE)

    # ----------------------------------------------------------------------------- form endpoints

    async def _form(self, request: web.Request) -> tuple[dict[str, str], str, str]:
        if request.rel_url.raw_query_string:
            # Credentials in a URL end up in proxies' and servers' logs; RFC 6749 2.3.1 forbids them there.
            raise OAuthError("invalid_request", "parameters go in the form body, not the query string")
        limit = min(MAX_FORM_BYTES, self.settings.max_body_bytes)
        raw = await read_body(request, limit, self.settings.body_timeout)
        form = parse_form(request, raw)
        authorization = request.headers.getall("Authorization", [])
        if len(authorization) > 1:
            raise OAuthError("invalid_request", "more than one Authorization header")
        header = authorization[0] if authorization else ""
        if not is_metadata_text(header):
            raise OAuthError("invalid_request", "the Authorization header must be printable ASCII")
        # No trusted-proxy handling at the edge: the peer address is the source (the registry's rate-limit key).
        return form, header, request.remote or ""

    async def token(self, request: web.Request) -> web.StreamResponse:
        form, header, source = await self._form(request)
        reply = await self._stub().Token(
            ipb.TokenRequest(form=form, authorization_header=header, source=source),
            timeout=self.settings.call_timeout,
            metadata=self._metadata(),
        )
        return _copy(reply)

    async def introspect(self, request: web.Request) -> web.StreamResponse:
        form, header, source = await self._form(request)
        reply = await self._stub().Introspect(
            ipb.IntrospectRequest(form=form, authorization_header=header, source=source),
            timeout=self.settings.call_timeout,
            metadata=self._metadata(),
        )
        return _copy(reply)

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        form, header, source = await self._form(request)
        reply = await self._stub().Revoke(
            ipb.RevokeRequest(form=form, authorization_header=header, source=source),
            timeout=self.settings.call_timeout,
            metadata=self._metadata(),
        )
        return _copy(reply)


def _document(text: str, cache: str) -> web.Response:
    return web.Response(
        body=text.encode("utf-8"), content_type="application/json", charset="utf-8", headers={"Cache-Control": cache}
    )


def _copy(reply: ipb.OAuthReply) -> web.Response:
    """The registry's answer as it gave it: status, JSON body, its extra headers, and never cached."""
    if not 200 <= reply.http_status <= 599:
        log.error("the authorization server answered an invalid HTTP status %d", reply.http_status)
        return oauth_error("server_error", "the authorization server gave an invalid answer", 500)
    headers: dict[str, Any] = dict(NO_STORE)
    for name, value in reply.headers.items():
        if name.lower() in _OWN_HEADERS or not is_metadata_text(value) or not is_metadata_text(name):
            continue
        headers[name] = value
    if not reply.json_body:
        return web.Response(status=reply.http_status, headers=headers)
    return web.Response(
        body=reply.json_body.encode("utf-8"),
        status=reply.http_status,
        content_type="application/json",
        headers=headers,
    )
