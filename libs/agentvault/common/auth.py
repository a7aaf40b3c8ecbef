"""Who is calling: the bearer credential in metadata, and the principal it resolves to."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

AUTHORIZATION_KEY = "authorization"
# The bootstrap admin token's principal (created by the registry's migration 0003); no API key can act as it.
BOOTSTRAP_PRINCIPAL_ID = "prn_bootstrap_admin"
BOOTSTRAP_PRINCIPAL_NAME = "admin"
MAX_TOKEN_LENGTH = 512


class Role(enum.StrEnum):
    ADMIN = "admin"
    MEMBER = "member"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `id` is what agents record as their owner: stable, unique and assigned by the
    registry, never chosen by a caller. `name` is for display only; several principals may share one."""

    name: str
    role: Role
    key_id: str
    # A federation peer calling with the credential this mesh issued to it; it sees only shared agents.
    is_peer: bool = False
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a principal needs its stable id")

    def owns(self, owner: str) -> bool:
        """Whether this caller is the principal recorded as `owner`; a peer owns nothing here."""
        return not self.is_peer and self.id == owner

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN and not self.is_peer


def bearer_token(metadata: Any) -> str | None:
    """The token from `authorization: Bearer <token>`, or None when absent; malformed values raise ValueError."""
    for key, value in metadata or ():
        if key != AUTHORIZATION_KEY:
            continue
        if not isinstance(value, str):
            raise ValueError("authorization must be text")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ValueError("authorization must be 'Bearer <token>'")
        token = token.strip()
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError("bearer token too long")
        return token
    return None
