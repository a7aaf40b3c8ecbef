"""Secrets of a local mesh kept in its data folder: the bootstrap admin token, the encryption key and each
service's own OAuth client secret."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def ensure_secret(data_dir: Path, name: str, make: Callable[[], str]) -> tuple[str, bool]:
    """A secret kept in the data folder (mode 0600), made on first use; returns it and whether it is new."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def ensure_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The bootstrap admin token of a local mesh."""
    import secrets

    return ensure_secret(data_dir, "admin_token", lambda: "avadmin_" + secrets.token_urlsafe(32))


def ensure_encryption_key(data_dir: Path) -> str:
    """The key that encrypts peer tokens at rest in a local mesh."""
    from agentvault.common.secretbox import SecretBox

    return ensure_secret(data_dir, "federation_encryption_key", SecretBox.generate_key)[0]


def new_service_secret() -> str:
    """A service client's secret: 43 URL-safe characters (never ',' or '=', the list's separators)."""
    import secrets

    return secrets.token_urlsafe(32)


def ensure_service_secrets(data_dir: Path) -> dict[str, str]:
    """Each service's own client secret (`service_secret_<name>`, mode 0600), made on first use and then reused,
    so the registry and the services agree across restarts."""
    from agentvault.common.services import identities

    return {
        spec.name: ensure_secret(data_dir, f"service_secret_{spec.name}", new_service_secret)[0]
        for spec in identities()
    }
