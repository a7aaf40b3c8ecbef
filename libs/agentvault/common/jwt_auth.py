"""Validating RFC 9068 JWT access tokens locally against the mesh's cached JWKS, and the principal they carry."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from agentvault.common import jose_keys
from agentvault.common.errors import Unauthenticated, Unavailable
from agentvault.common.lru import Lru
from agentvault.common.principal import Kind, Principal, parse_scopes
from agentvault.common.settings import Env

log = logging.getLogger(__name__)

JwksSource = Callable[[], Awaitable[Mapping[str, Any]]]
RevocationCheck = Callable[[str], Awaitable[bool]]

# Error reasons (ErrorInfo.reason), not secrets.
TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105
TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"  # noqa: S105
TOKEN_AUDIENCE = "TOKEN_AUDIENCE"  # noqa: S105
TOKEN_ISSUER = "TOKEN_ISSUER"  # noqa: S105
TOKEN_ALGORITHM = "TOKEN_ALGORITHM"  # noqa: S105
TOKEN_KEY_UNKNOWN = "TOKEN_KEY_UNKNOWN"  # noqa: S105
TOKEN_SIGNATURE = "TOKEN_SIGNATURE"  # noqa: S105
TOKEN_REVOKED = "TOKEN_REVOKED"  # noqa: S105
TOKEN_MALFORMED = "TOKEN_MALFORMED"  # noqa: S105
# Not in the design's list: a JWT that is not an access token (an ID token, a client assertion) used as one.
TOKEN_TYPE = "TOKEN_TYPE"  # noqa: S105

DEFAULT_LEEWAY = 30.0
# OAUTH_CLOCK_SKEW_SECONDS: the clock skew every validator allows on exp, nbf and iat (the leeway), 0..300 seconds.
CLOCK_SKEW_VAR = "OAUTH_CLOCK_SKEW_SECONDS"
MAX_CLOCK_SKEW = 300
# OAUTH_TOKEN_CACHE_BYTES: memory for the tokens already verified (a full check costs ~160 us, an ES256 verify
# most of it; a remembered token a hash and a lookup); 0 verifies every call in full.
CACHE_BYTES_VAR = "OAUTH_TOKEN_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 4 * 1024 * 1024
# What one verified token costs in memory beyond its JSON payload: the claims dict, the Principal, the entry.
CACHED_TOKEN_OVERHEAD = 2048
CACHED_PAYLOAD_FACTOR = 4
JWKS_TTL = 300.0
# However many unknown kids arrive, the JWKS source is asked again at most this often.
JWKS_MIN_REFRESH = 30.0
JWKS_RETRY = 1.0
MAX_JWKS_KEYS = 32
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")


def looks_like_jwt(token: str) -> bool:
    """A bearer token is a JWT when it has exactly two dots; API keys and federation credentials have none."""
    return token.count(".") == 2


def cache_bytes_setting(environ: Mapping[str, str] | None = None) -> int:
    """OAUTH_TOKEN_CACHE_BYTES (default 4 MiB, 0 off); SettingsError when malformed."""
    return Env(environ).int(CACHE_BYTES_VAR, DEFAULT_CACHE_BYTES, minimum=0)


def clock_skew(environ: Mapping[str, str] | None = None) -> float:
    """The leeway on time claims from OAUTH_CLOCK_SKEW_SECONDS (default 30, 0..300); SettingsError when malformed."""
    return float(Env(environ).int(CLOCK_SKEW_VAR, int(DEFAULT_LEEWAY), minimum=0, maximum=MAX_CLOCK_SKEW))


@dataclass(frozen=True)
class _Verified:
    """A token whose signature, header and claims were checked once: what validate returns for it."""

    claims: dict[str, Any]
    principal: Principal | None
    kid: str
    exp: float


def _refuse(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(f"invalid access token: {message}", reason)


def _b64_json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise _refuse(TOKEN_MALFORMED, f"the {what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise _refuse(TOKEN_MALFORMED, f"the {what} is not a JSON object")
    return value


class JwtValidator:
    """Checks, in order: size and shape, `alg` (ES256 only), `typ`, `kid` in the JWKS, the signature, the time
    claims with `leeway` seconds of clock skew, `iss`, `aud`, then revocation. Every refusal is Unauthenticated
    with a reason saying which check failed.

    A token that passed is remembered (by the SHA-256 of its bytes, within `cache_bytes` of memory; 0 turns this
    off): the next call with the same bytes skips the parsing and the signature, whose outcome cannot change, but
    still checks what can: its kid is still in the JWKS, exp against the clock, and revocation on every call.
    `leeway` defaults to OAUTH_CLOCK_SKEW_SECONDS, `cache_bytes` to OAUTH_TOKEN_CACHE_BYTES.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_source: JwksSource,
        *,
        leeway: float | None = None,
        revoked: RevocationCheck | None = None,
        jwks_ttl: float = JWKS_TTL,
        min_refresh: float = JWKS_MIN_REFRESH,
        clock: Callable[[], float] = time.time,
        cache_bytes: int | None = None,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks_source = jwks_source
        self.leeway = clock_skew() if leeway is None else leeway
        self.revoked = revoked
        self.jwks_ttl = jwks_ttl
        self.min_refresh = min_refresh
        self.clock = clock
        self._keys: dict[str, ECKey] = {}
        self._loaded_at: float | None = None  # monotonic
        self._forced_at: float | None = None
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()
        self.jwks_fetches = 0
        # Only tokens this validator verified get in, so an outsider cannot fill it with junk; bounded in bytes.
        budget = cache_bytes_setting() if cache_bytes is None else cache_bytes
        self._verified: Lru[bytes, _Verified] | None = (
            Lru(1 << 30, budget=budget, weigh=_weight) if budget > 0 else None
        )
        self.cache_hits = 0

    @property
    def cached_bytes(self) -> int:
        """Memory charged to the remembered tokens."""
        return self._verified.bytes if self._verified is not None else 0

    async def validate(self, token: str) -> Principal:
        verified = await self._verify(token)
        if verified.principal is not None:
            return verified.principal
        # Refused after the signature: a malformed principal is never cached, so it is refused again each time.
        return principal_from_claims(verified.claims)

    async def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of `token`; Unauthenticated with the failed check's reason otherwise."""
        # A copy: the remembered claims serve every later call with the same token.
        return dict((await self._verify(token)).claims)

    async def _verify(self, token: str) -> _Verified:
        if not isinstance(token, str) or len(token) > jose_keys.MAX_TOKEN_BYTES:
            raise _refuse(TOKEN_MALFORMED, f"tokens are at most {jose_keys.MAX_TOKEN_BYTES} bytes")
        if not token.isascii() or not looks_like_jwt(token):
            raise _refuse(TOKEN_MALFORMED, "not a compact JWS (header.payload.signature)")
        digest = hashlib.sha256(token.encode()).digest() if self._verified is not None else b""
        known = self._verified.get(digest) if self._verified is not None else None
        # What may change since the token was verified: its key leaving the JWKS and the clock passing exp (nbf
        # and iat only move further into the past). When either did, it is checked in full again, so it is refused
        # exactly as a first validation would refuse it.
        if known is not None and await self._still_valid(digest, known):
            self.cache_hits += 1
        else:
            known = await self._check(token)
            if self._verified is not None and known.principal is not None:
                self._verified.put(digest, known)
        if self.revoked is not None and await self.revoked(known.claims["jti"]):
            raise _refuse(TOKEN_REVOKED, "the token was revoked")
        return known

    async def _still_valid(self, digest: bytes, known: _Verified) -> bool:
        """Whether a remembered token still passes; forgets it (so it is checked in full again) when not."""
        await self._refresh_if_stale()
        if known.kid in self._keys and known.exp > self.clock() - self.leeway:
            return True
        assert self._verified is not None
        self._verified.pop(digest)
        return False

    async def _check(self, token: str) -> _Verified:
        """Every check but revocation, in full."""
        header = _b64_json(token.split(".", 1)[0], "header")
        alg = header.get("alg")
        if alg != jose_keys.ALGORITHM:
            raise _refuse(TOKEN_ALGORITHM, f"alg must be {jose_keys.ALGORITHM}, not {str(alg)[:20]!r}")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in jose_keys.TOKEN_TYPES:
            raise _refuse(TOKEN_TYPE, f"typ must be {jose_keys.TOKEN_TYPE!r} (RFC 9068), not {str(typ)[:30]!r}")
        if header.get("crit"):
            raise _refuse(TOKEN_MALFORMED, "no critical header extensions are understood")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 128:
            raise _refuse(TOKEN_MALFORMED, "the header must name its key (kid)")
        key = await self._key(kid)
        try:
            verified = jws.deserialize_compact(token, key, algorithms=[jose_keys.ALGORITHM])
        except JoseError as exc:
            raise _refuse(TOKEN_SIGNATURE, "the signature does not verify") from exc
        try:
            claims = json.loads(verified.payload)
        except ValueError as exc:
            raise _refuse(TOKEN_MALFORMED, "the payload is not JSON") from exc
        if not isinstance(claims, dict):
            raise _refuse(TOKEN_MALFORMED, "the payload is not a JSON object")
        self._check_claims(claims)
        try:
            principal: Principal | None = principal_from_claims(claims)
        except Unauthenticated:
            principal = None
        return _Verified(claims, principal, kid, float(claims["exp"]))

    def _check_claims(self, claims: dict[str, Any]) -> None:
        missing = [name for name in REQUIRED_CLAIMS if name not in claims]
        if missing:
            raise _refuse(TOKEN_MALFORMED, f"missing claims: {', '.join(missing)}")
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise _refuse(TOKEN_MALFORMED, f"{name} must be a number")
        for name in ("sub", "jti", "client_id", "iss"):
            if not isinstance(claims[name], str) or not claims[name]:
                raise _refuse(TOKEN_MALFORMED, f"{name} must be a non-empty string")
        now = self.clock()
        if claims["exp"] <= now - self.leeway:
            raise _refuse(TOKEN_EXPIRED, "the token has expired")
        not_before = claims.get("nbf", claims["iat"])
        if not_before > now + self.leeway or claims["iat"] > now + self.leeway:
            raise _refuse(TOKEN_NOT_YET_VALID, "the token is not valid yet")
        if claims["iss"] != self.issuer:
            raise _refuse(TOKEN_ISSUER, f"the issuer must be {self.issuer!r}")
        audience = claims["aud"]
        audiences = audience if isinstance(audience, list) else [audience]
        if self.audience not in audiences:
            raise _refuse(TOKEN_AUDIENCE, f"the token is not meant for {self.audience!r}")

    async def _refresh_if_stale(self) -> None:
        if self._loaded_at is None or time.monotonic() - self._loaded_at >= self.jwks_ttl:
            await self._refresh(force=False)

    async def _key(self, kid: str) -> ECKey:
        await self._refresh_if_stale()
        key = self._keys.get(kid)
        if key is None:
            # A key rotated in since the last fetch: ask once, but never faster than min_refresh.
            await self._refresh(force=True)
            key = self._keys.get(kid)
        if key is None:
            raise _refuse(TOKEN_KEY_UNKNOWN, "the signing key (kid) is not one of the issuer's")
        return key

    async def _refresh(self, *, force: bool) -> None:
        seen = self._loaded_at
        async with self._lock:
            now = time.monotonic()
            if self._loaded_at != seen:
                return  # another caller refreshed while we waited for the lock
            if self._loaded_at is None and self._failed_at is not None and now - self._failed_at < JWKS_RETRY:
                # Without keys every call would ask again: while the source is down, ask once a second at most.
                raise Unavailable("the signing keys cannot be fetched now; retry later", "JWKS_UNAVAILABLE")
            if force:
                # Unknown kids are what an outsider controls: they may cause one fetch per min_refresh, no more.
                if self._forced_at is not None and now - self._forced_at < self.min_refresh:
                    return
                self._forced_at = now
            self.jwks_fetches += 1
            try:
                document = await self.jwks_source()
                keys = _parse_jwks(document)
            except Exception as exc:
                if self._loaded_at is None:
                    self._failed_at = now
                    log.warning("cannot fetch the JWKS: %s", exc)
                    raise Unavailable(
                        "the signing keys cannot be fetched now; retry later", "JWKS_UNAVAILABLE"
                    ) from None
                # Keep serving with the keys we have; try again after min_refresh rather than at every call.
                log.warning("cannot refresh the JWKS, keeping %d cached keys: %s", len(self._keys), exc)
                self._loaded_at = now - self.jwks_ttl + self.min_refresh
                return
            self._keys = keys
            self._loaded_at = now


def _weight(verified: _Verified) -> int:
    """Memory a remembered token is charged: its claims grow with the payload, the rest is about fixed."""
    return CACHED_TOKEN_OVERHEAD + CACHED_PAYLOAD_FACTOR * len(json.dumps(verified.claims))


def _parse_jwks(document: Mapping[str, Any]) -> dict[str, ECKey]:
    """The ES256 public keys of a JWK Set by kid; anything else in it (other types, private parts) is ignored."""
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("a JWKS is an object with a 'keys' list")
    keys: dict[str, ECKey] = {}
    for entry in entries[:MAX_JWKS_KEYS]:
        if not isinstance(entry, Mapping) or entry.get("alg", jose_keys.ALGORITHM) != jose_keys.ALGORITHM:
            continue
        if entry.get("use", "sig") != "sig" or not isinstance(entry.get("kid"), str):
            continue
        try:
            public = {name: entry[name] for name in ("kty", "crv", "x", "y")}
            keys[entry["kid"]] = jose_keys.import_key(public)
        except (KeyError, ValueError, JoseError) as exc:
            log.warning("ignoring a JWKS entry: %s", exc)
    return keys


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """The caller a verified token speaks for."""
    agent_id = claims.get("avm_agent") or ""
    raw_kind = claims.get("avm_kind") or (Kind.AGENT if agent_id else Kind.SERVICE)
    try:
        kind = Kind(raw_kind)
        scopes = parse_scopes(claims.get("scope") or "")
    except ValueError as exc:
        raise _refuse(TOKEN_MALFORMED, str(exc)) from None
    act = claims.get("act")
    actor = act.get("sub", "") if isinstance(act, Mapping) else ""
    owner = claims.get("avm_owner") or ""
    if not all(isinstance(value, str) for value in (agent_id, owner, actor)):
        raise _refuse(TOKEN_MALFORMED, "avm_agent, avm_owner and act.sub must be strings")
    try:
        return Principal(
            kind,
            claims["sub"],
            scopes=scopes,
            owner=owner,
            name=claims["sub"],
            client_id=claims["client_id"],
            agent_id=agent_id,
            key_id=claims["jti"],
            actor=actor,
            expires_at=float(claims["exp"]),
        )
    except ValueError as exc:
        raise _refuse(TOKEN_MALFORMED, str(exc)) from None
