"""Encryption at rest for secrets the mesh must be able to read back (peer tokens): Fernet, rotatable.

FEDERATION_ENCRYPTION_KEYS is a comma-separated list of Fernet keys; the first encrypts, all decrypt, so a
key is rotated by putting a new one first and re-encrypting (`SecretBox.rotate`).
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from agentvault.common.settings import Env, SettingsError

ENV_VAR = "FEDERATION_ENCRYPTION_KEYS"


class DecryptionError(ValueError):
    """The ciphertext was not made with any of the configured keys."""


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        self.key_count = len(keys)
        if not keys:
            raise SettingsError(f"{ENV_VAR} must hold at least one Fernet key")
        try:
            fernets = [Fernet(k.encode()) for k in keys]
            self._primary = fernets[0]
            self._fernet = MultiFernet(fernets)
        except ValueError:
            raise SettingsError(f"{ENV_VAR}: every key must be 32 url-safe base64-encoded bytes") from None

    @classmethod
    def from_env(cls, env: Env | None = None) -> SecretBox:
        raw = (env or Env()).str(ENV_VAR, required=True)
        return cls([k.strip() for k in raw.split(",") if k.strip()])

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode()

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except (InvalidToken, ValueError):
            raise DecryptionError("secret cannot be decrypted with the configured keys") from None

    def rotate_if_needed(self, ciphertext: str) -> str:
        """The ciphertext unchanged when the primary key already decrypts it, else re-encrypted under it."""
        try:
            self._primary.decrypt(ciphertext.encode())
            return ciphertext
        except (InvalidToken, ValueError):
            return self.rotate(ciphertext)

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypts under the primary key (a new token each time, even when it already used that key)."""
        try:
            return self._fernet.rotate(ciphertext.encode()).decode()
        except (InvalidToken, ValueError):
            raise DecryptionError("secret cannot be decrypted with the configured keys") from None
