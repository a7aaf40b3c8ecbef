"""Console sign-in sessions in Redis: a random id in the cookie, the credential encrypted at rest, a TTL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentvault.common.settings import Env, SettingsError
from agentvault_edge import errors

log = logging.getLogger(__name__)

KEY_PREFIX = "console:session:"
# What a session keeps besides the encrypted credential: small, so a session costs Redis well under a KiB.
MAX_CREDENTIAL_CHARS = 4096
MIN_KEY_CHARS = 32
_HKDF_INFO = b"agentvault console session v1"


def session_cipher(env: Env) -> Fernet:
    """CONSOLE_SESSION_KEY, else the mesh's FEDERATION_ENCRYPTION_KEYS, through HKDF; else a key of this process
    only (sessions then end when the edge restarts and are not shared by replicas, which the log says)."""
    material = env.str("CONSOLE_SESSION_KEY")
    if material and len(material) < MIN_KEY_CHARS:
        raise SettingsError(f"CONSOLE_SESSION_KEY must be at least {MIN_KEY_CHARS} characters")
    if not material:
        material = env.str("FEDERATION_ENCRYPTION_KEYS").split(",")[0].strip()
    if not material:
        log.warning(
            "console sessions use a key of this process only: set CONSOLE_SESSION_KEY to share them between "
            "replicas and keep them across restarts"
        )
        material = secrets.token_urlsafe(32)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(material.encode())
    return Fernet(base64.urlsafe_b64encode(key))


@dataclass(frozen=True)
class Session:
    credential: str
    csrf_token: str
    name: str
    role: str

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf_token.encode())


@asynccontextmanager
async def redis_answers() -> AsyncIterator[None]:
    """Redis down is a 503 saying so, never a 500."""
    try:
        yield
    except RedisError as exc:
        log.warning("console session store unavailable: %s", type(exc).__name__)
        raise errors.EdgeError(
            503, grpc.StatusCode.UNAVAILABLE, "the console's session store (Redis) is unavailable; try again"
        ) from None


class SessionStore:
    """Redis keys hold the SHA-256 of the session id, so whoever reads Redis cannot take over a session."""

    def __init__(self, redis: Redis, cipher: Fernet, ttl_seconds: int) -> None:
        self._redis = redis
        self._cipher = cipher
        self.ttl_seconds = ttl_seconds

    @staticmethod
    def _key(session_id: str) -> str:
        return KEY_PREFIX + hashlib.sha256(session_id.encode()).hexdigest()

    async def create(self, credential: str, name: str, role: str) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        session = Session(credential, secrets.token_urlsafe(32), name, role)
        record = {
            "credential": self._cipher.encrypt(credential.encode()).decode(),
            "csrf": session.csrf_token,
            "name": name,
            "role": role,
        }
        async with redis_answers():
            await self._redis.set(self._key(session_id), json.dumps(record), ex=self.ttl_seconds)
        return session_id, session

    async def get(self, session_id: str) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        async with redis_answers():
            raw = await self._redis.get(self._key(session_id))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            credential = self._cipher.decrypt(record["credential"].encode()).decode()
        except (InvalidToken, ValueError, KeyError, TypeError):
            # Made under another key (CONSOLE_SESSION_KEY changed): the person signs in again.
            return None
        return Session(credential, str(record["csrf"]), str(record.get("name", "")), str(record.get("role", "")))

    async def delete(self, session_id: str) -> None:
        async with redis_answers():
            await self._redis.delete(self._key(session_id))
