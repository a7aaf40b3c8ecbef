"""An OAuth 2.0 client credentials client: cached access tokens, refreshed early, one fetch in flight at a time."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import grpc

from agentvault.common.auth import AUTHORIZATION_KEY
from agentvault.common.errors import Unavailable
from agentvault.identity.v1 import identity_service_pb2 as ipb

log = logging.getLogger(__name__)

CLIENT_SECRET_BASIC = "client_secret_basic"  # noqa: S105 - a method name, not a secret
CLIENT_SECRET_POST = "client_secret_post"  # noqa: S105 - a method name, not a secret
AUTH_METHODS = (CLIENT_SECRET_BASIC, CLIENT_SECRET_POST)
MAX_RESPONSE_BYTES = 64 * 1024
REFRESH_AT = 0.8
# When the server does not say how long a token lives (expires_in is only RECOMMENDED), assume this.
DEFAULT_EXPIRES_IN = 300
TIMEOUT_SECONDS = 10.0


class TokenFetchFailed(Unavailable):
    """The token endpoint did not give a token; the message names the endpoint and the OAuth error, never secrets."""

    default_reason = "TOKEN_FETCH_FAILED"


def _safe_url(url: str) -> str:
    """The URL without userinfo, query or fragment, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _printable(value: Any, limit: int = 200) -> str:
    text = str(value)[:limit]
    return "".join(ch if ch.isprintable() else "?" for ch in text)


class TokenSource:
    """Access tokens for one client at one token endpoint (RFC 6749 4.4).

    A token is reused until REFRESH_AT of its lifetime has passed; then the next caller fetches a new one while
    the others wait for that same fetch. If the refresh fails and the old token has not expired, it is still used.
    After a 401 / UNAUTHENTICATED, `invalidate(token)` drops it so the retry fetches a fresh one. When the server
    issues refresh tokens, the next fetch uses the latest one (RFC 6749 6) and falls back to client credentials
    when it is refused.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scopes: Iterable[str] = (),
        audience: str = "",
        auth_method: str = CLIENT_SECRET_BASIC,
        session: aiohttp.ClientSession | None = None,
        timeout: float = TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(AUTH_METHODS)}")
        if urlsplit(token_url).scheme not in ("http", "https"):
            raise ValueError("the token URL must be http(s)")
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scopes = tuple(scopes)
        self.audience = audience
        self.auth_method = auth_method
        self.timeout = timeout
        self.clock = clock
        self._session = session
        self._own_session = session is None
        self._lock = asyncio.Lock()
        self._token: str | None = None
        # Only when the server issues one (RFC 6749 6); rotated at every use, so held here and nowhere else.
        self._refresh_token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self.fetches = 0

    def __repr__(self) -> str:
        # Never the secret or the token.
        return f"TokenSource({_safe_url(self.token_url)!r}, client_id={self.client_id!r})"

    async def token(self) -> str:
        """A valid access token, fetched only when the cached one is due for refresh."""
        cached = self._token
        if cached is not None and self.clock() < self._refresh_at:
            return cached
        async with self._lock:
            # Whoever held the lock before us may have fetched one already: one fetch for all the waiters.
            cached = self._token
            if cached is not None and self.clock() < self._refresh_at:
                return cached
            try:
                return await self._fetch()
            except TokenFetchFailed:
                if cached is not None and self.clock() < self._expires_at:
                    log.warning("token refresh failed; using the current token until it expires", exc_info=True)
                    # Try again soon, not at every call: each attempt holds every caller for up to `timeout`.
                    self._refresh_at = min(self._expires_at, self.clock() + 5.0)
                    return cached
                raise

    def invalidate(self, token: str | None = None) -> None:
        """Forgets the cached token (only if it is still `token`, so many 401s cost one fetch, not one each)."""
        if token is None or token == self._token:
            self._token = None
            self._refresh_at = self._expires_at = 0.0

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata carrying the token."""
        return ((AUTHORIZATION_KEY, f"Bearer {await self.token()}"),)

    async def headers(self) -> dict[str, str]:
        """HTTP headers carrying the token."""
        return {"Authorization": f"Bearer {await self.token()}"}

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _form_and_headers(self, refresh_token: str | None) -> tuple[dict[str, str], dict[str, str]]:
        if refresh_token is not None:
            form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        else:
            form = {"grant_type": "client_credentials"}
            if self.scopes:
                form["scope"] = " ".join(self.scopes)
            if self.audience:
                form["audience"] = self.audience
        headers = {"Accept": "application/json"}
        if self.auth_method == CLIENT_SECRET_BASIC:
            # RFC 6749 2.3.1: each part form-urlencoded before it is joined and base64-encoded.
            pair = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.client_id
            form["client_secret"] = self._secret
        return form, headers

    async def _fetch(self) -> str:
        refresh_token = self._refresh_token
        if refresh_token is not None:
            try:
                return await self._request(refresh_token)
            except TokenFetchFailed as exc:
                if "error" not in exc.metadata:
                    raise  # the endpoint did not answer; client credentials would fare no better
                # Expired, revoked or reused: the client's own credentials still get a token.
                log.info("refresh token refused (%s); using client credentials", exc.metadata["error"])
                self._refresh_token = None
        return await self._request(None)

    async def _exchange(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        """POSTs the form to the token endpoint: its HTTP status and (bounded) body."""
        url = _safe_url(self.token_url)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                self.token_url,
                data=form,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                return response.status, await _read_bounded(response, url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenFetchFailed(
                f"cannot reach the token endpoint {url}: {type(exc).__name__}", token_url=url
            ) from None

    async def _request(self, refresh_token: str | None) -> str:
        url = _safe_url(self.token_url)
        form, headers = self._form_and_headers(refresh_token)
        self.fetches += 1
        started = self.clock()
        status, body = await self._exchange(form, headers)
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise TokenFetchFailed(f"the token endpoint {url} answered {status} without a JSON object", token_url=url)
        if status != 200:
            error = _printable(reply.get("error", "unknown"), 64)
            description = _printable(reply.get("error_description", ""))
            detail = f"{error}: {description}" if description else error
            raise TokenFetchFailed(
                f"the token endpoint {url} refused client {self.client_id!r} ({status} {detail})",
                token_url=url,
                error=error,
            )
        token = reply.get("access_token")
        token_type = str(reply.get("token_type", ""))
        if not isinstance(token, str) or not token or token_type.lower() != "bearer":
            raise TokenFetchFailed(f"the token endpoint {url} gave no bearer access_token", token_url=url)
        expires_in = reply.get("expires_in", DEFAULT_EXPIRES_IN)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            raise TokenFetchFailed(f"the token endpoint {url} gave an invalid expires_in", token_url=url)
        new_refresh = reply.get("refresh_token")
        if isinstance(new_refresh, str) and new_refresh:
            self._refresh_token = new_refresh
        self._token = token
        self._refresh_at = started + REFRESH_AT * expires_in
        self._expires_at = started + expires_in
        log.info(
            "access token fetched", extra={"token_url": url, "client_id": self.client_id, "expires_in": expires_in}
        )
        return token


async def _read_bounded(response: aiohttp.ClientResponse, url: str) -> bytes:
    declared = response.content_length
    if declared is not None and declared > MAX_RESPONSE_BYTES:
        raise TokenFetchFailed(f"the token endpoint {url} answered more than {MAX_RESPONSE_BYTES} bytes", token_url=url)
    body = await response.content.read(MAX_RESPONSE_BYTES + 1)
    # read(n) may return less than is there; keep reading until the end or the bound.
    while len(body) <= MAX_RESPONSE_BYTES:
        more = await response.content.read(MAX_RESPONSE_BYTES + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > MAX_RESPONSE_BYTES:
        raise TokenFetchFailed(f"the token endpoint {url} answered more than {MAX_RESPONSE_BYTES} bytes", token_url=url)
    return body


TOKEN_METHOD = "/agentvault.identity.v1.IdentityService/Token"  # noqa: S105 - an RPC name, not a secret


class GrpcTokenSource(TokenSource):
    """The same client, asking the registry's IdentityService.Token over a gRPC channel the service already has:
    a mesh service gets its own token without depending on the edge's HTTP endpoint. The channel must not carry
    a BearerInterceptor of this source (the token call would need a token)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        address: str,
        client_id: str,
        client_secret: str,
        *,
        scopes: Iterable[str] = (),
        audience: str = "",
        timeout: float = TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The URL only names the endpoint in messages and logs.
        super().__init__(
            f"http://{address}{TOKEN_METHOD}",
            client_id,
            client_secret,
            scopes=scopes,
            audience=audience,
            timeout=timeout,
            clock=clock,
        )
        self._token_call = channel.unary_unary(
            TOKEN_METHOD,
            request_serializer=ipb.TokenRequest.SerializeToString,
            response_deserializer=ipb.OAuthReply.FromString,
        )

    def __repr__(self) -> str:
        return f"GrpcTokenSource({_safe_url(self.token_url)!r}, client_id={self.client_id!r})"

    async def _exchange(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        url = _safe_url(self.token_url)
        request = ipb.TokenRequest(form=form, authorization_header=headers.get("Authorization", ""))
        try:
            reply = await self._token_call(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise TokenFetchFailed(f"cannot reach the token endpoint {url}: {exc.code().name}", token_url=url) from None
        body = reply.json_body.encode()
        if len(body) > MAX_RESPONSE_BYTES:
            raise TokenFetchFailed(
                f"the token endpoint {url} answered more than {MAX_RESPONSE_BYTES} bytes", token_url=url
            )
        return reply.http_status, body


class BearerInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the source's token to every unary call and, after UNAUTHENTICATED, retries once with a fresh one."""

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        token = await self._token()
        call = await continuation(self._with_token(client_call_details, token), request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            self.source.invalidate(token)
            fresh = await self._token()
            return await continuation(self._with_token(client_call_details, fresh), request)
        return call

    async def _token(self) -> str:
        """The token; a failure is logged in full here, and the caller of the RPC being served learns only that
        this service cannot authenticate now (the token endpoint's address is the operator's business)."""
        try:
            return await self.source.token()
        except TokenFetchFailed as exc:
            log.warning("cannot get this service's access token: %s", exc.message)
            raise Unavailable(
                "this service cannot authenticate to the services it calls now; its log says why",
                "SERVICE_TOKEN_UNAVAILABLE",
            ) from None

    @staticmethod
    def _with_token(details: Any, token: str) -> grpc.aio.ClientCallDetails:
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != AUTHORIZATION_KEY]
        metadata.append((AUTHORIZATION_KEY, f"Bearer {token}"))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
        )


class _BearerPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, source: TokenSource, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.loop = loop

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        # gRPC asks from its own thread; the token comes from the source's event loop, without blocking either.
        future = asyncio.run_coroutine_threadsafe(self.source.token(), self.loop)

        def done(result: Any) -> None:
            try:
                callback(((AUTHORIZATION_KEY, f"Bearer {result.result()}"),), None)
            except Exception as exc:
                callback((), exc)

        future.add_done_callback(done)


def call_credentials(source: TokenSource) -> grpc.CallCredentials:
    """Per-call credentials carrying the source's token, for secure channels (gRPC sends call credentials only
    over TLS or local transports); call from the event loop the source runs on. Insecure channels use
    BearerInterceptor instead."""
    return grpc.metadata_call_credentials(_BearerPlugin(source, asyncio.get_running_loop()), name="oauth2-bearer")
