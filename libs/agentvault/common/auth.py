"""Who is calling: the bearer credential in metadata, and the principal it resolves to."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

AUTHORIZATION_KEY = "authorization"
MAX_TOKEN_LENGTH = 512


class Role(enum.StrEnum):
    ADMIN = "admin"
    MEMBER = "member"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `name` is what agents record as their owner."""

    name: str
    role: Role
    key_id: str
    # A federation peer calling with the credential this mesh issued to it; it sees only shared agents.
    is_peer: bool = False

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
