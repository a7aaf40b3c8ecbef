"""The operator console: its pages at /console, sign-in sessions, and the session cookie in place of a bearer token."""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import web
from multidict import CIMultiDict

from agentvault.common.ratelimit import MinuteWindow
from agentvault.common.redis import create_redis
from agentvault.common.settings import Env
from agentvault.registry.v1 import registry_service_pb2 as rpb
from agentvault.registry.v1 import registry_service_pb2_grpc as rpb_grpc
from agentvault_edge import errors
from agentvault_edge.backends import Backends
from agentvault_edge.console.sessions import (
    MAX_CREDENTIAL_CHARS,
    Session,
    SessionStore,
    redis_answers,
    session_cipher,
)
from agentvault_edge.forwarding import is_metadata_text
from agentvault_edge.request_body import parse_json, read_body
from agentvault_edge.responses import json_response
from agentvault_edge.settings import EdgeSettings

log = logging.getLogger(__name__)

PREFIX = "/console"
SESSION_PATH = "/console/api/session"
STATIC_PREFIX = "/console/static/"
COOKIE = "agentvault_console"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The API paths a console session may call: the transcoded REST routes, nothing else (not OAuth, A2A or MCP).
API_PREFIX = "/api/"
MAX_SIGN_IN_BYTES = 8 * 1024
DEFAULT_TTL_SECONDS = 8 * 3600
# Refused sign-ins a client address may make a minute before it is refused outright (guessing credentials).
DEFAULT_SIGN_IN_FAILURES_PER_MINUTE = 20
SIGN_IN_RATE_SCOPE = "console:signin:failures:"
MAX_ADDRESS_CHARS = 64
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# Nothing but the mesh's own files; no inline script or style, no framing, no form posts elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file of static/, read once: the package is the whole console, nothing is fetched or built."""
    assets: dict[str, tuple[bytes, str]] = {}
    for item in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in CONTENT_TYPES:
            assets[item.name] = (item.read_bytes(), CONTENT_TYPES[suffix])
    return assets


class Console:
    """Serves /console and its session API; `authorize` lets a console session call the REST API."""

    def __init__(self, settings: EdgeSettings, backends: Backends, env: Env | None = None) -> None:
        env = env or Env()
        self.settings = settings
        self.backends = backends
        self.assets = _load_assets()
        redis_url = env.str("CONSOLE_REDIS_URL") or env.str("REDIS_URL")
        self.force_secure = env.bool("CONSOLE_COOKIE_SECURE", False)
        ttl = env.int("CONSOLE_SESSION_TTL_SECONDS", DEFAULT_TTL_SECONDS, minimum=60, maximum=30 * 86400)
        self.sign_in_failures_per_minute = env.int(
            "CONSOLE_SIGN_IN_FAILURES_PER_MINUTE", DEFAULT_SIGN_IN_FAILURES_PER_MINUTE, minimum=1, maximum=100_000
        )
        self._redis = create_redis(redis_url) if redis_url else None
        self.sessions = SessionStore(self._redis, session_cipher(env), ttl) if self._redis is not None else None

    async def close(self, app: web.Application) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    @staticmethod
    def owns(raw_path: str) -> bool:
        return raw_path == PREFIX or raw_path.startswith(PREFIX + "/")

    @staticmethod
    def label(raw_path: str) -> str:
        """The metrics label: one per kind of path, whatever file was asked for."""
        return STATIC_PREFIX + "*" if raw_path.startswith(STATIC_PREFIX) else raw_path

    # ------------------------------------------------------------------------------- pages and assets

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if path == SESSION_PATH:
            return await self._session_api(request)
        if request.method not in ("GET", "HEAD"):
            raise errors.method_not_allowed(request.method, ["GET"])
        if path in (PREFIX, PREFIX + "/"):
            return self._asset("index.html")
        if path.startswith(STATIC_PREFIX):
            name = path[len(STATIC_PREFIX) :]
            if name in self.assets and name != "index.html":
                return self._asset(name)
        raise errors.not_found(path)

    def _asset(self, name: str) -> web.Response:
        body, content_type = self.assets[name]
        response = web.Response(body=body, content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS)
        # The page itself always fresh (a new edge may ship new scripts); the files it names briefly cached.
        response.headers["Cache-Control"] = "no-cache" if name == "index.html" else "max-age=300"
        return response

    # ------------------------------------------------------------------------------- sessions

    def _store(self) -> SessionStore:
        if self.sessions is None:
            raise errors.EdgeError(
                503,
                grpc.StatusCode.UNAVAILABLE,
                "the console needs Redis for its sessions: set REDIS_URL (or CONSOLE_REDIS_URL) for the edge",
            )
        return self.sessions

    async def _session_api(self, request: web.Request) -> web.StreamResponse:
        _check_origin(request)
        if request.method == "POST":
            return await self._sign_in(request)
        if request.method == "GET":
            session = await self._current(request)
            return _no_store(json_response(_describe(session)))
        if request.method == "DELETE":
            session_id = request.cookies.get(COOKIE, "")
            session = await self._current(request)
            if not session.csrf_matches(request.headers.get(CSRF_HEADER)):
                raise _csrf_refused()
            await self._store().delete(session_id)
            response = _no_store(json_response({"signed_out": True}))
            response.del_cookie(COOKIE, path="/")
            return response
        raise errors.method_not_allowed(request.method, ["GET", "POST", "DELETE"])

    async def _current(self, request: web.Request) -> Session:
        session_id = request.cookies.get(COOKIE, "")
        session = await self._store().get(session_id) if session_id else None
        if session is None:
            raise errors.EdgeError(
                401, grpc.StatusCode.UNAUTHENTICATED, "not signed in to the console (or the session ended)"
            )
        return session

    async def _sign_in(self, request: web.Request) -> web.StreamResponse:
        store = self._store()
        if request.content_type != "application/json":
            # Also what keeps another site's plain form from signing a browser in (a JSON POST needs CORS).
            raise errors.unsupported_media_type(request.content_type)
        raw = await read_body(request, MAX_SIGN_IN_BYTES, self.settings.body_timeout)
        body: Any = parse_json(raw.decode("utf-8", errors="replace"))
        credential = body.get("credential") if isinstance(body, dict) else None
        if not isinstance(credential, str) or not credential.strip():
            raise errors.bad_request("credential", "an API key or bearer token is required")
        credential = credential.strip()
        if credential.lower().startswith("bearer "):
            credential = credential[7:].strip()
        if len(credential) > MAX_CREDENTIAL_CHARS or not is_metadata_text(credential):
            raise errors.bad_request("credential", f"at most {MAX_CREDENTIAL_CHARS} printable ASCII characters")
        window = await self._refuse_if_guessing(request)
        try:
            caller = await self._caller(credential)
            if not caller.kind or caller.is_peer:
                raise errors.EdgeError(
                    401, grpc.StatusCode.UNAUTHENTICATED, "this credential cannot sign in to the console"
                )
        except errors.EdgeError as exc:
            if exc.http_status == 401:
                await self._count_failure(window)
            raise
        role = rpb.Role.Name(caller.role).removeprefix("ROLE_").lower()
        session_id, session = await store.create(credential, caller.name, role)
        log.info("console sign-in", extra={"principal": caller.principal_id, "role": role})
        response = _no_store(json_response(_describe(session)))
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=store.ttl_seconds,
            path="/",
            httponly=True,
            secure=self.force_secure or request.secure,
            samesite="Strict",
        )
        return response

    async def _refuse_if_guessing(self, request: web.Request) -> MinuteWindow:
        """429 once this client address had too many refused sign-ins this minute (one Redis GET per sign-in;
        only refusals count, so people signing in many times are never limited)."""
        now = time.time()
        window = MinuteWindow.of(SIGN_IN_RATE_SCOPE + (request.remote or "")[:MAX_ADDRESS_CHARS], now)
        if self._redis is None:
            return window
        async with redis_answers():
            failures = int(await self._redis.get(window.key) or 0)
        if failures >= self.sign_in_failures_per_minute:
            retry = window.retry_after(now)
            log.warning("console sign-in refused: too many failures", extra={"source": request.remote or ""})
            raise errors.EdgeError(
                429,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many refused sign-ins from this address; retry in {retry} seconds",
                headers={"Retry-After": str(retry)},
            )
        return window

    async def _count_failure(self, window: MinuteWindow) -> None:
        if self._redis is None:
            return
        async with redis_answers(), self._redis.pipeline(transaction=False) as pipe:
            window.count(pipe)
            await pipe.execute()

    async def _caller(self, credential: str) -> rpb.Caller:
        """The registry's GetCaller with the credential: the cheapest call that proves the mesh accepts it."""
        stub = rpb_grpc.RegistryServiceStub(self.backends.channel(self.backends.address("registry")))
        try:
            caller: rpb.Caller = await stub.GetCaller(
                rpb.GetCallerRequest(),
                metadata=[("authorization", f"Bearer {credential}")],
                timeout=self.settings.call_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise errors.from_rpc_error(exc, "agentvault.registry.v1.RegistryService") from None
        return caller

    # ------------------------------------------------------------------------------- the REST API

    async def authorize(self, request: web.Request) -> web.Request:
        """A REST API request carrying the console cookie (and no Authorization) as if it carried the session's
        credential as a bearer token; a state-changing one only with the session's CSRF token in X-CSRF-Token."""
        if (
            self.sessions is None
            or COOKIE not in request.cookies
            or "Authorization" in request.headers
            or not request.rel_url.raw_path.startswith(API_PREFIX)
        ):
            return request
        _check_origin(request)
        session = await self._current(request)
        if request.method not in SAFE_METHODS and not session.csrf_matches(request.headers.get(CSRF_HEADER)):
            raise _csrf_refused()
        headers = CIMultiDict(request.headers)
        headers["Authorization"] = f"Bearer {session.credential}"
        return request.clone(headers=headers)


def _describe(session: Session) -> dict[str, str]:
    return {"name": session.name, "role": session.role, "csrf_token": session.csrf_token}


def _no_store(response: web.Response) -> web.Response:
    response.headers["Cache-Control"] = "no-store"
    return response


def _csrf_refused() -> errors.EdgeError:
    return errors.EdgeError(
        403,
        grpc.StatusCode.PERMISSION_DENIED,
        f"a console request that changes something needs the {CSRF_HEADER} header",
    )


def _check_origin(request: web.Request) -> None:
    """A browser names the page that made a request; one from another site is refused (SameSite aside)."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise errors.EdgeError(403, grpc.StatusCode.PERMISSION_DENIED, "a console request from another origin")
