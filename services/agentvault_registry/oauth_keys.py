"""The authorization server's ES256 signing keys: made on first need, rotated on a schedule, private parts encrypted."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

from joserfc.jwk import ECKey

from agentvault.common import jose_keys
from agentvault.common.lease import Leases
from agentvault.common.secretbox import SecretBox
from agentvault_registry.oauth_store import OAuthStore, SigningKeyRecord

log = logging.getLogger(__name__)

# Replicas serialize key creation on this transaction-scoped advisory lock, so two never make a key at once.
_KEY_LOCK = 0x0A7_0A17_5161
# Keys are reread at least this often, so a key another replica made or retired is seen soon.
RELOAD_SECONDS = 10.0
LEASE_KIND = "signing"
LEASE_ID = "rotate"


class SigningKeys:
    """The active key signs; every key not yet expired is published in the JWKS."""

    def __init__(self, store: OAuthStore, box: SecretBox, rotation_seconds: float, token_ttl: float) -> None:
        self.store = store
        self.box = box
        self.rotation_seconds = rotation_seconds
        self.token_ttl = token_ttl
        self.leases = Leases(store.pool, "oauth_leases", "chore_kind", "chore_id")
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._records: list[SigningKeyRecord] = []
        self._loaded_at = 0.0
        self._active: tuple[str, ECKey] | None = None
        self._lock = asyncio.Lock()

    async def _reload(self) -> None:
        self._records = await self.store.signing_keys()
        self._loaded_at = time.monotonic()

    def _active_record(self) -> SigningKeyRecord | None:
        now = datetime.now(UTC)
        for record in self._records:  # newest first
            if record.retire_at > now:
                return record
        return None

    async def active(self) -> ECKey:
        """The key to sign with now, made when there is none (first use, or the last one retired)."""
        record = self._active_record()
        if record is None or time.monotonic() - self._loaded_at > RELOAD_SECONDS:
            async with self._lock:
                await self._reload()
                record = self._active_record()
                if record is None:
                    await self.ensure_active()
                    await self._reload()
                    record = self._active_record()
        if record is None:  # pragma: no cover - ensure_active just made one
            raise RuntimeError("no active signing key")
        if self._active is None or self._active[0] != record.kid:
            private = self.box.decrypt(record.private_jwk_encrypted.decode())
            self._active = (record.kid, jose_keys.import_key(json.loads(private)))
        return self._active[1]

    async def ensure_active(self, *, force: bool = False) -> bool:
        """Makes a new active key when none is active (or, with `force`, retires the active ones first); true if
        one was made. The advisory lock makes replicas take turns, and the one that comes second sees the key."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
            if force:
                await conn.execute(
                    """UPDATE oauth_signing_keys SET retire_at = now(), expire_at = now() + make_interval(secs => $1)
                       WHERE retire_at > now()""",
                    self.token_ttl,
                )
            elif await conn.fetchval("SELECT true FROM oauth_signing_keys WHERE retire_at > now() LIMIT 1"):
                return False
            key = jose_keys.generate_key()
            encrypted = self.box.encrypt(jose_keys.private_jwk_json(key)).encode()
            await conn.execute(
                """INSERT INTO oauth_signing_keys (kid, private_jwk_encrypted, public_jwk, retire_at, expire_at)
                   VALUES ($1, $2, $3, now() + make_interval(secs => $4), now() + make_interval(secs => $4 + $5))""",
                jose_keys.key_id(key),
                encrypted,
                jose_keys.public_jwk(key),
                float(self.rotation_seconds),
                float(self.token_ttl),
            )
            await conn.execute("DELETE FROM oauth_signing_keys WHERE expire_at <= now()")
        log.info("made a new access token signing key", extra={"kid": jose_keys.key_id(key)})
        self._loaded_at = 0.0
        return True

    async def rotate_now(self) -> None:
        """Retires the active key at once (it stays in the JWKS one token lifetime) and makes a new one."""
        await self.ensure_active(force=True)
        async with self._lock:
            await self._reload()

    async def jwks(self) -> dict[str, Any]:
        """The JWK Set of every key not yet expired: public members only."""
        if time.monotonic() - self._loaded_at > RELOAD_SECONDS:
            async with self._lock:
                await self._reload()
        if self._active_record() is None:
            # Asked before any token was signed: make the key now, so validators never see an empty set.
            await self.active()
        keys = [jose_keys.public_jwk(jose_keys.import_key(r.public_jwk)) for r in self._records]
        return {"keys": keys}

    async def run(self) -> None:
        """Rotates on schedule (and drops expired refresh tokens): one replica at a time, under a lease."""
        period = max(1.0, min(60.0, self.rotation_seconds / 10))
        while True:
            try:
                if await self.leases.claim_one(LEASE_KIND, LEASE_ID, self._owner, hold=period):
                    await self.ensure_active()
                    # Expired refresh tokens can neither be used nor reused: their rows only take space.
                    await self.store.purge_refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("signing key rotation check failed: %s", exc)
            await asyncio.sleep(period)
