"""The mesh calling an agent as the agent's registration says: API key, bearer, OAuth 2.0 client credentials, mTLS."""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from agentvault.common import agents as rules
from agentvault.common import egress
from agentvault.common.errors import Unavailable
from agentvault.common.lru import Lru
from agentvault.common.peers import TlsFiles
from agentvault.common.secretbox import DecryptionError, SecretBox
from agentvault.common.token_source import TokenSource

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
# What one cached agent's credentials cost beyond the lengths of its configuration: the token source with its
# access token (a JWT of a few KiB at most), the SSL context, the bookkeeping.
PREPARED_OVERHEAD = 16 * 1024
DEFAULT_BUDGET = 16 * 1024 * 1024
DEFAULT_SIZE = 100_000


class AgentAuthUnavailable(Unavailable):
    """The mesh cannot authenticate to this agent now (no key ring, no client certificate, no token)."""

    default_reason = "AGENT_AUTH_UNAVAILABLE"


@dataclass
class PreparedAuth:
    """What a call to one agent needs: fixed headers, a token source (OAuth) and an SSL context (mTLS, own CA)."""

    kind: str
    fingerprint: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    source: TokenSource | None = None
    ssl_context: ssl.SSLContext | None = None
    weight: int = 0

    async def request_headers(self) -> tuple[dict[str, str], str | None]:
        """The headers for one request, and the access token in them (to invalidate after a 401)."""
        if self.source is None:
            return dict(self.headers), None
        token = await self.source.token()
        return {"Authorization": f"Bearer {token}"}, token


NO_AUTH = PreparedAuth(rules.AUTH_NONE, "")


def fingerprint(auth: rules.AgentAuth, secret: str) -> str:
    """A digest of the configuration and its secret: equal exactly when the same credentials would be used."""
    material = json.dumps([auth.as_json(), secret], sort_keys=True).encode()
    return hashlib.sha256(material).hexdigest()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


class AgentConnector:
    """Prepared credentials per agent, bounded in bytes: an agent's entry is reused while its registration's
    version (update time) is unchanged, and its token source survives changes that leave its auth as it was, so
    a token is fetched once however many checks and calls use it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        tls: TlsFiles | None,
        *,
        block_private: bool = False,
        budget: int = DEFAULT_BUDGET,
        size: int = DEFAULT_SIZE,
    ) -> None:
        # Token requests go through this session too: a token URL is user input like the agent's own URL.
        self.session = session
        self.tls = tls
        self.block_private = block_private
        self._cache: Lru[str, tuple[str, PreparedAuth]] = Lru(size, budget=budget)

    @property
    def bytes(self) -> int:
        return self._cache.bytes

    async def for_agent(
        self, agent_id: str, version: str, resolve: Callable[[], Awaitable[tuple[rules.AgentAuth, str]]]
    ) -> PreparedAuth:
        """The agent's credentials; `resolve` (configuration and decrypted secret) runs when `version` moved."""
        cached = self._cache.get(agent_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        auth, secret = await resolve()
        prepared = self.prepare(auth, secret, cached[1] if cached is not None else None)
        self._cache.put(agent_id, (version, prepared), prepared.weight)
        return prepared

    def forget(self, agent_id: str) -> None:
        self._cache.pop(agent_id)

    def prepare(self, auth: rules.AgentAuth, secret: str, previous: PreparedAuth | None = None) -> PreparedAuth:
        """Credentials for `auth` with its decrypted `secret`; `previous` is reused when nothing in them changed."""
        if auth.kind == rules.AUTH_NONE:
            return NO_AUTH
        digest = fingerprint(auth, secret)
        if previous is not None and previous.fingerprint == digest:
            return previous
        if auth.needs_secret and not secret:
            raise AgentAuthUnavailable(f"no {rules.AUTH_SECRET_FIELDS[auth.kind]} is stored for this agent")
        weight = PREPARED_OVERHEAD + len(secret) + sum(len(str(v)) for v in auth.as_json().values())
        context = self._ssl_context(auth)
        if auth.kind == rules.AUTH_API_KEY:
            header = auth.api_key_header or rules.DEFAULT_API_KEY_HEADER
            return PreparedAuth(auth.kind, digest, {header: secret}, None, context, weight)
        if auth.kind == rules.AUTH_BEARER:
            return PreparedAuth(auth.kind, digest, {"Authorization": f"Bearer {secret}"}, None, context, weight)
        if auth.kind == rules.AUTH_OAUTH2:
            # A name is checked where it resolves (the session's resolver); a literal address here.
            try:
                egress.check_url(auth.token_url, self.block_private)
            except egress.EgressRefused as exc:
                raise AgentAuthUnavailable(f"the token URL is refused: {exc}") from None
            source = TokenSource(
                auth.token_url,
                auth.client_id,
                secret,
                scopes=auth.scopes,
                audience=auth.audience,
                auth_method=auth.token_endpoint_auth_method or rules.TOKEN_AUTH_METHODS[0],
                session=self.session,
            )
            return PreparedAuth(auth.kind, digest, {}, source, context, weight)
        return PreparedAuth(auth.kind, digest, {}, None, context, weight)

    def _ssl_context(self, auth: rules.AgentAuth) -> ssl.SSLContext | None:
        if auth.kind != rules.AUTH_MTLS and not auth.ca_pem:
            return None  # the session's default: the system's trust roots
        context = ssl.create_default_context()
        try:
            if auth.ca_pem:
                context.load_verify_locations(cadata=auth.ca_pem)
            if auth.kind == rules.AUTH_MTLS:
                if self.tls is None:
                    raise AgentAuthUnavailable(
                        "the agent requires mutual TLS but FEDERATION_TLS_CA/CERT/KEY are not set on this service"
                    )
                # The mesh's CA is trusted too: agents inside the mesh usually have certificates from it.
                context.load_verify_locations(cafile=self.tls.ca)
                context.load_cert_chain(self.tls.cert, self.tls.key)
        except (ssl.SSLError, OSError) as exc:
            raise AgentAuthUnavailable(f"cannot load the TLS material for this agent: {exc}") from None
        return context


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    auth: PreparedAuth,
    *,
    max_body: int = MAX_BODY,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Answer:
    """One request to an agent with its credentials. A 401 to an OAuth access token invalidates that token and
    retries exactly once with a fresh one (every concurrent caller's 401 to the same token costs one fetch).
    Redirects are not followed: the credentials are for this address only. The body is read up to `max_body`."""
    if auth.ssl_context is not None:
        kwargs["ssl"] = auth.ssl_context
    kwargs.setdefault("allow_redirects", False)
    extra, token = await auth.request_headers()
    answer = await _send(session, method, url, {**(headers or {}), **extra}, max_body, kwargs)
    if answer.status == 401 and auth.source is not None and token is not None:
        auth.source.invalidate(token)
        extra, _ = await auth.request_headers()
        # The host only: an agent's URL is user input and may carry anything in its path or query.
        log.info(
            "agent refused the access token; retrying once with a fresh one", extra={"host": urlsplit(url).hostname}
        )
        answer = await _send(session, method, url, {**(headers or {}), **extra}, max_body, kwargs)
    return answer


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    max_body: int,
    kwargs: dict[str, Any],
) -> Answer:
    async with session.request(method, url, headers=headers, **kwargs) as response:
        # read(n) answers what has arrived so far, not n bytes: loop until EOF or the bound.
        body = bytearray()
        while len(body) < max_body:
            chunk = await response.content.read(max_body - len(body))
            if not chunk:
                break
            body += chunk
        return Answer(response.status, dict(response.headers), bytes(body))


async def resolve_agent_auth(
    registry: Any, agent_id: str, box: SecretBox | None, *, timeout: float = 5.0
) -> tuple[rules.AgentAuth, str]:
    """How the mesh authenticates to an agent, with its secret decrypted: the registry's ResolveAgentAuth (scope
    agents:connect) on `registry`, a RegistryService stub whose channel carries the service's own token."""
    from agentvault.common.enums import enum_words
    from agentvault.registry.v1 import registry_service_pb2 as reg_pb

    reply = await registry.ResolveAgentAuth(reg_pb.ResolveAgentAuthRequest(agent_id=agent_id), timeout=timeout)
    a = reply.auth
    auth = rules.AgentAuth(
        kind=enum_words(reg_pb.AgentAuthKind.DESCRIPTOR).word(a.kind) or rules.AUTH_NONE,
        api_key_header=a.api_key_header,
        token_url=a.token_url,
        client_id=a.client_id,
        scopes=tuple(a.scopes),
        audience=a.audience,
        token_endpoint_auth_method=a.token_endpoint_auth_method,
        ca_pem=a.ca_pem,
        secret_set=a.secret_set,
    )
    if not reply.encrypted_secret:
        return auth, ""
    if box is None:
        raise AgentAuthUnavailable("the agent's secret cannot be read: FEDERATION_ENCRYPTION_KEYS is not set")
    try:
        return auth, box.decrypt(reply.encrypted_secret)
    except DecryptionError:
        raise AgentAuthUnavailable("the agent's secret cannot be decrypted with FEDERATION_ENCRYPTION_KEYS") from None
