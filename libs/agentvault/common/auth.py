"""Who is calling: the bearer credential in metadata (the principal it resolves to is agentvault.common.principal)."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentvault.common.principal import Principal

AUTHORIZATION_KEY = "authorization"
# The bootstrap admin token's principal (created by the registry's migration 0003); no API key can act as it.
BOOTSTRAP_PRINCIPAL_ID = "prn_bootstrap_admin"
BOOTSTRAP_PRINCIPAL_NAME = "admin"
# Room for a JWT access token (jose_keys.MAX_TOKEN_BYTES); API keys and federation credentials are far shorter.
MAX_TOKEN_LENGTH = 4096


class Role(enum.StrEnum):
    ADMIN = "admin"
    MEMBER = "member"


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


def acting_principal(principal: Principal) -> Principal:
    """Whom an access token acts as, the same in every service: the principal that registered its OAuth client
    (`avm_owner`). Agents it creates are that principal's, and it may change that principal's agents, within its
    scopes; `subject` and `client_id` still name the client itself. Why: owners are principals (agents.owner
    references them), and a client answers to whoever registered it, so an admin's agent-bound client acts for
    the admin. A token without an owner acts as its `sub`."""
    if principal.owner and principal.kind != "peer":
        return dataclasses.replace(principal, id=principal.owner)
    return principal
