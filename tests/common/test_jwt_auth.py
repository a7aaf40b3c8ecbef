"""JWT access tokens: what jose_keys signs, JwtValidator accepts (and PyJWT too), and every forgery it refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import jwt as pyjwt
import pytest
import redis.asyncio as aioredis

from agentvault.common import jose_keys
from agentvault.common.auth import Role
from agentvault.common.errors import PermissionDenied, Unauthenticated
from agentvault.common.jwt_auth import JwtValidator, clock_skew, looks_like_jwt
from agentvault.common.principal import Kind, Principal, peer, person, require_scope
from agentvault.common.revocations import RevocationWatcher, revoke
from agentvault.common.settings import SettingsError

from ..conftest import Infra, eventually

ISSUER = "https://mesh.example"
AUDIENCE = "agentvault"


class Jwks:
    """A JWKS source that counts how often it is asked, standing in for the registry's GetJwks."""

    def __init__(self, *keys: Any) -> None:
        self.keys = list(keys)
        self.fetches = 0

    async def __call__(self) -> dict[str, Any]:
        self.fetches += 1
        return jose_keys.jwks(self.keys)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


def issue(key: Any, **overrides: Any) -> jose_keys.SignedToken:
    args: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "subject": "svc-discovery",
        "client_id": "svc-discovery",
        "scopes": ["agents:read", "federation:resolve"],
        "ttl": 900,
        "kind": "service",
    }
    args.update(overrides)
    return jose_keys.sign_access_token(key, **args)


def claims_of(key: Any, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "svc-discovery",
        "aud": AUDIENCE,
        "exp": now + 900,
        "iat": now,
        "nbf": now,
        "jti": secrets.token_urlsafe(12),
        "client_id": "svc-discovery",
        "scope": "agents:read",
        "avm_kind": "service",
    }
    claims.update(overrides)
    return claims


def es256(key: Any, claims: dict[str, Any], **header: Any) -> str:
    """A genuinely signed token with any header and claims, for the checks after the signature."""
    from joserfc import jwt

    full = {"alg": "ES256", "typ": "at+jwt", "kid": jose_keys.key_id(key), **header}
    return jwt.encode(full, claims, key, algorithms=["ES256"])


@pytest.fixture
def key() -> Any:
    return jose_keys.generate_key()


def validator(source: Jwks, **kwargs: Any) -> JwtValidator:
    return JwtValidator(ISSUER, AUDIENCE, source, **kwargs)


async def refusal(check: JwtValidator, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as err:
        await check.validate(token)
    return err.value


async def test_a_signed_token_gives_its_principal(key: Any) -> None:
    signed = issue(key, kind="agent", agent_id="agt_1", owner="prn_alice", subject="cli_1", client_id="cli_1")
    principal = await validator(Jwks(key)).validate(signed.token)
    assert principal.kind is Kind.AGENT
    assert (principal.id, principal.subject, principal.client_id) == ("cli_1", "cli_1", "cli_1")
    assert (principal.agent_id, principal.owner, principal.key_id) == ("agt_1", "prn_alice", signed.jti)
    assert principal.scopes == {"agents:read", "federation:resolve"}
    assert principal.expires_at == signed.expires_at
    assert not principal.is_admin and not principal.is_peer
    assert looks_like_jwt(signed.token) and not looks_like_jwt("avk_0123456789abcdef_secret")


async def test_the_header_and_kid_follow_rfc9068_and_rfc7638(key: Any) -> None:
    signed = issue(key)
    header = json.loads(base64.urlsafe_b64decode(signed.token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": jose_keys.key_id(key)}
    public = jose_keys.public_jwk(key)
    assert "d" not in public and public["kid"] == header["kid"]
    # RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace.
    canonical = json.dumps({m: public[m] for m in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    assert header["kid"] == b64(hashlib.sha256(canonical.encode()).digest())
    again = jose_keys.import_key(json.loads(jose_keys.private_jwk_json(key)))
    assert jose_keys.key_id(again) == jose_keys.key_id(key)


async def test_pyjwt_validates_a_token_against_the_exported_jwks(key: Any) -> None:
    signed = issue(key)
    jwk_set = pyjwt.PyJWKSet.from_dict(jose_keys.jwks([jose_keys.generate_key(), key]))
    kid = pyjwt.get_unverified_header(signed.token)["kid"]
    signing_key = next(k for k in jwk_set.keys if k.key_id == kid)
    claims = pyjwt.decode(signed.token, signing_key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["jti"] == signed.jti and claims["client_id"] == "svc-discovery"
    assert pyjwt.get_unverified_header(signed.token)["typ"] == "at+jwt"


async def test_alg_none_is_refused(key: Any) -> None:
    token = f"{b64json({'alg': 'none', 'typ': 'at+jwt', 'kid': jose_keys.key_id(key)})}.{b64json(claims_of(key))}."
    assert (await refusal(validator(Jwks(key)), token)).reason == "TOKEN_ALGORITHM"


async def test_hs256_signed_with_the_public_key_is_refused(key: Any) -> None:
    header = b64json({"alg": "HS256", "typ": "at+jwt", "kid": jose_keys.key_id(key)})
    body = b64json(claims_of(key, scope="admin"))
    check = validator(Jwks(key))
    # The classic confusion: the public key, in either form a verifier might hold, used as an HMAC secret.
    for secret in (key.as_pem(private=False), json.dumps(jose_keys.public_jwk(key)).encode()):
        signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        err = await refusal(check, f"{header}.{body}.{b64(signature)}")
        assert err.reason == "TOKEN_ALGORITHM" and "ES256" in err.message


async def test_an_unknown_kid_is_refused_after_one_refresh(key: Any) -> None:
    source = Jwks(key)
    check = validator(source)
    await check.validate(issue(key).token)
    assert source.fetches == 1
    stranger = jose_keys.generate_key()
    assert (await refusal(check, issue(stranger).token)).reason == "TOKEN_KEY_UNKNOWN"
    assert source.fetches == 2
    # A flood of unknown kids does not turn into a flood of JWKS fetches.
    for _ in range(5):
        assert (await refusal(check, issue(jose_keys.generate_key()).token)).reason == "TOKEN_KEY_UNKNOWN"
    assert source.fetches == 2


async def test_a_rotated_in_key_is_found_by_the_refresh_and_the_old_one_still_works(key: Any) -> None:
    source = Jwks(key)
    check = validator(source, min_refresh=0)
    old = issue(key).token
    await check.validate(old)
    new_key = jose_keys.generate_key()
    source.keys.append(new_key)
    assert (await check.validate(issue(new_key).token)).subject == "svc-discovery"
    assert (await check.validate(old)).subject == "svc-discovery"
    assert source.fetches == 2


async def test_a_tampered_payload_is_refused(key: Any) -> None:
    header, _, signature = issue(key).token.split(".")
    forged = f"{header}.{b64json(claims_of(key, scope='admin'))}.{signature}"
    assert (await refusal(validator(Jwks(key)), forged)).reason == "TOKEN_SIGNATURE"


async def test_a_signature_by_another_key_under_a_known_kid_is_refused(key: Any) -> None:
    other = jose_keys.generate_key()
    token = es256(other, claims_of(key), kid=jose_keys.key_id(key))
    assert (await refusal(validator(Jwks(key)), token)).reason == "TOKEN_SIGNATURE"


async def test_an_expired_token_is_refused_beyond_the_leeway(key: Any) -> None:
    now = int(time.time())
    check = validator(Jwks(key), leeway=30)
    within = es256(key, claims_of(key, iat=now - 120, nbf=now - 120, exp=now - 10))
    assert (await check.validate(within)).subject == "svc-discovery"
    expired = es256(key, claims_of(key, iat=now - 120, nbf=now - 120, exp=now - 31))
    err = await refusal(check, expired)
    assert err.reason == "TOKEN_EXPIRED" and "expired" in err.message


async def test_a_token_not_yet_valid_is_refused_beyond_the_leeway(key: Any) -> None:
    now = int(time.time())
    check = validator(Jwks(key), leeway=30)
    assert (await check.validate(es256(key, claims_of(key, nbf=now + 10)))).subject == "svc-discovery"
    assert (await refusal(check, es256(key, claims_of(key, nbf=now + 60)))).reason == "TOKEN_NOT_YET_VALID"
    assert (await refusal(check, es256(key, claims_of(key, iat=now + 60, nbf=now)))).reason == "TOKEN_NOT_YET_VALID"


async def test_a_wrong_issuer_is_refused(key: Any) -> None:
    err = await refusal(validator(Jwks(key)), issue(key, issuer="https://other.example").token)
    assert err.reason == "TOKEN_ISSUER" and ISSUER in err.message


async def test_a_wrong_audience_is_refused(key: Any) -> None:
    check = validator(Jwks(key))
    assert (await refusal(check, issue(key, audience="someone-else").token)).reason == "TOKEN_AUDIENCE"
    # A list of audiences is fine when ours is in it.
    assert (await check.validate(es256(key, claims_of(key, aud=["x", AUDIENCE])))).subject == "svc-discovery"


async def test_a_jwt_that_is_not_an_access_token_is_refused(key: Any) -> None:
    check = validator(Jwks(key))
    for token in (es256(key, claims_of(key), typ="JWT"), _without_typ(key)):
        err = await refusal(check, token)
        assert err.reason == "TOKEN_TYPE" and "at+jwt" in err.message


def _without_typ(key: Any) -> str:
    from joserfc import jwt

    return jwt.encode({"alg": "ES256", "kid": jose_keys.key_id(key)}, claims_of(key), key, algorithms=["ES256"])


async def test_an_oversize_token_is_refused_before_parsing(key: Any) -> None:
    source = Jwks(key)
    token = es256(key, claims_of(key, padding="x" * 5000))
    err = await refusal(validator(source), token)
    assert err.reason == "TOKEN_MALFORMED" and "4096" in err.message
    assert source.fetches == 0


async def test_malformed_tokens_are_refused_with_a_clear_reason(key: Any) -> None:
    check = validator(Jwks(key))
    missing_jti = es256(key, {k: v for k, v in claims_of(key).items() if k != "jti"})
    for token in ("a.b.c", "not-a-jwt", "é.é.é", missing_jti, es256(key, claims_of(key, avm_kind="robot"))):
        assert (await refusal(check, token)).reason == "TOKEN_MALFORMED"


async def test_a_revoked_jti_is_refused(key: Any, infra: Infra) -> None:
    redis: aioredis.Redis = aioredis.Redis.from_url(f"{infra.redis_base}/0")
    scope = "t" + secrets.token_hex(6)
    watcher = RevocationWatcher(redis, key=f"{scope}:revoked", channel=f"{scope}:revocations")
    check = validator(Jwks(key), revoked=watcher.is_revoked)
    try:
        signed, other = issue(key), issue(key)
        await check.validate(signed.token)
        await revoke(redis, signed.jti, signed.expires_at, key=watcher.key, channel=watcher.channel)
        err = await refusal(check, signed.token)
        assert err.reason == "TOKEN_REVOKED"
        assert (await check.validate(other.token)).key_id == other.jti
    finally:
        await redis.delete(watcher.key)
        await redis.aclose()


async def test_an_unreachable_jwks_is_unavailable_not_unauthenticated(key: Any) -> None:
    from agentvault.common.errors import Unavailable

    calls = []

    async def broken() -> dict[str, Any]:
        calls.append(1)
        raise OSError("registry down")

    check = JwtValidator(ISSUER, AUDIENCE, broken)
    for _ in range(3):
        with pytest.raises(Unavailable) as err:
            await check.validate(issue(key).token)
        assert err.value.reason == "JWKS_UNAVAILABLE"
    assert len(calls) == 1  # a down source is not asked again at every call


async def test_a_failed_refresh_keeps_the_cached_keys(key: Any) -> None:
    source = Jwks(key)
    check = validator(source, jwks_ttl=0, min_refresh=0)
    await check.validate(issue(key).token)

    async def broken() -> dict[str, Any]:
        raise OSError("registry down")

    check.jwks_source = broken
    assert (await check.validate(issue(key).token)).subject == "svc-discovery"


async def test_a_token_exchange_names_its_actor(key: Any) -> None:
    signed = issue(key, kind="person", subject="prn_alice", client_id="svc-discovery", actor={"sub": "svc-discovery"})
    principal = await validator(Jwks(key)).validate(signed.token)
    assert principal.kind is Kind.PERSON and principal.owns("prn_alice") and principal.actor == "svc-discovery"


def test_admin_implies_every_scope_and_missing_scopes_are_named() -> None:
    admin = person("prn_a", "alice", Role.ADMIN)
    member = person("prn_m", "mallory", Role.MEMBER)
    assert admin.is_admin and admin.has_scope("federation:admin")
    assert require_scope(admin, "federation:admin") is admin
    assert require_scope(member, "agents:write") is member
    with pytest.raises(PermissionDenied) as err:
        require_scope(member, "federation:admin")
    assert err.value.reason == "SCOPE_REQUIRED" and "federation:admin" in err.value.message
    assert err.value.metadata == {"scope": "federation:admin"}
    with pytest.raises(Unauthenticated):
        require_scope(None, "agents:read")


def test_peers_own_nothing_and_are_never_admins() -> None:
    other = peer("peer_b", "mesh-b")
    assert other.is_peer and not other.is_admin and not other.owns("peer_b")
    assert person("prn_a", "alice", Role.MEMBER).owns("prn_a")
    with pytest.raises(ValueError, match="admin"):
        Principal(Kind.PEER, "peer_b", scopes=frozenset({"admin"}))
    with pytest.raises(ValueError, match="stable id"):
        Principal(Kind.SERVICE, "")


# A verified token is remembered -----------------------------------------------------------------------------


async def test_a_verified_token_is_remembered_so_its_signature_is_checked_once(key: Any) -> None:
    check = validator(Jwks(key))
    signed = issue(key)
    first = await check.validate(signed.token)
    assert check.cache_hits == 0
    assert await check.validate(signed.token) == first and check.cache_hits == 1
    # The same token with one byte of its signature changed is other bytes: checked in full, and refused.
    header, payload, signature = signed.token.split(".")
    forged = f"{header}.{payload}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}{signature[-1]}"
    assert (await refusal(check, forged)).reason == "TOKEN_SIGNATURE" and check.cache_hits == 1
    # Callers get their own copy of the claims: changing it changes nothing for the next caller.
    (await check.claims(signed.token))["scope"] = "admin"
    assert (await check.claims(signed.token))["scope"] == "agents:read federation:resolve"


async def test_a_remembered_token_that_gets_revoked_is_refused(key: Any, infra: Infra) -> None:
    redis: aioredis.Redis = aioredis.Redis.from_url(f"{infra.redis_base}/0")
    scope = "t" + secrets.token_hex(6)
    watcher = RevocationWatcher(redis, key=f"{scope}:revoked", channel=f"{scope}:revocations")
    check = validator(Jwks(key), revoked=watcher.is_revoked)
    try:
        signed = issue(key)
        await check.validate(signed.token)
        await check.validate(signed.token)
        assert check.cache_hits == 1
        await revoke(redis, signed.jti, signed.expires_at, key=watcher.key, channel=watcher.channel)
        assert (await refusal(check, signed.token)).reason == "TOKEN_REVOKED"
        assert (await refusal(check, signed.token)).reason == "TOKEN_REVOKED"
    finally:
        await redis.delete(watcher.key)
        await redis.aclose()


async def test_a_remembered_token_is_refused_once_it_expires(key: Any) -> None:
    check = validator(Jwks(key), leeway=0)
    now = int(time.time())
    token = es256(key, claims_of(key, iat=now, nbf=now, exp=now + 2))
    await check.validate(token)
    await check.validate(token)
    assert check.cache_hits == 1

    async def expired() -> None:
        reason = ""
        try:
            await check.validate(token)
        except Unauthenticated as err:
            reason = err.reason
        assert reason == "TOKEN_EXPIRED", "the token is still accepted"

    await eventually(expired, seconds=10)
    assert time.time() >= now + 2


async def test_a_remembered_token_is_refused_once_its_key_leaves_the_jwks(key: Any) -> None:
    source = Jwks(key)
    check = validator(source, jwks_ttl=0, min_refresh=0)
    signed = issue(key)
    await check.validate(signed.token)
    source.keys = [jose_keys.generate_key()]
    assert (await refusal(check, signed.token)).reason == "TOKEN_KEY_UNKNOWN"


async def test_remembered_tokens_are_bounded_in_bytes(key: Any) -> None:
    budget = 16 * 1024
    check = validator(Jwks(key), cache_bytes=budget)
    tokens = [issue(key).token for _ in range(40)]
    for token in tokens:
        await check.validate(token)
    assert 0 < check.cached_bytes <= budget
    await check.validate(tokens[-1])
    assert check.cache_hits == 1
    # Off: every call checks the signature.
    cold = validator(Jwks(key), cache_bytes=0)
    for _ in range(3):
        await cold.validate(tokens[0])
    assert cold.cache_hits == 0 and cold.cached_bytes == 0


def test_the_clock_skew_is_configurable_and_bounded() -> None:
    assert clock_skew({}) == 30
    assert clock_skew({"OAUTH_CLOCK_SKEW_SECONDS": "2"}) == 2
    assert clock_skew({"OAUTH_CLOCK_SKEW_SECONDS": "0"}) == 0
    for bad in ("301", "-1", "ten"):
        with pytest.raises(SettingsError, match="OAUTH_CLOCK_SKEW_SECONDS"):
            clock_skew({"OAUTH_CLOCK_SKEW_SECONDS": bad})
