"""The mesh services' own OAuth clients, made from SERVICE_CLIENT_SECRETS at start: the configuration is their truth."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping

from agentvault.common.services import identities
from agentvault_registry.oauth_grants import hash_secret
from agentvault_registry.oauth_store import OAuthStore

log = logging.getLogger(__name__)


# The principals of the mesh services' own clients; no API key or admin-made client gets one.
SERVICE_PRINCIPAL_PREFIX = "prn_service_"


def service_principal_id(name: str) -> str:
    """The principal a service's tokens act as: its own, reserved like the bootstrap admin's."""
    return f"{SERVICE_PRINCIPAL_PREFIX}{name}"


async def apply(
    store: OAuthStore, secrets: Mapping[str, str], revoke: Callable[[str], Awaitable[None]] | None = None
) -> None:
    """Each configured service gets its client `svc-<name>` with exactly the scopes of the service list and the
    configured secret (stored hashed; a changed secret rotates it). A client an admin disabled is enabled again
    only with a new secret, so a restart never revives a compromised one. A service client no longer configured
    is disabled (and its tokens revoked): a secret removed from the configuration stops working."""
    for spec in identities():
        client_id = spec.client_id
        secret = secrets.get(spec.name)
        found = await store.get_client_secret(client_id)
        if secret is None:
            if found is not None and not found[0].disabled:
                await store.set_disabled(client_id, True)
                if revoke is not None:
                    await revoke(client_id)
                log.warning("service client disabled: no secret configured for it", extra={"client_id": client_id})
            continue
        digest = hash_secret(secret)
        changed = found is None or found[1] is None or not hmac.compare_digest(found[1], digest)
        # A token acts as its client's owner: each service owns itself, never the bootstrap admin's agents.
        owner = service_principal_id(spec.name)
        await store.pool.execute(
            "INSERT INTO principals (id, name, kind) VALUES ($1, $2, 'service') ON CONFLICT (id) DO NOTHING",
            owner,
            client_id,
        )
        await store.upsert_service_client(client_id, spec.name, list(spec.scopes), digest, owner)
        if found is not None and found[0].disabled:
            if changed:
                await store.set_disabled(client_id, False)
                log.info("service client enabled again with a new secret", extra={"client_id": client_id})
            else:
                log.warning(
                    "service client stays disabled: give it a new secret to enable it", extra={"client_id": client_id}
                )
        elif changed:
            log.info("service client secret set", extra={"client_id": client_id, "scopes": " ".join(spec.scopes)})
