"""The federation invitation handshake: invitation codes, the transcript, its proof, and the keys both meshes derive.

B (the inviting mesh) gives A's admin a code holding B's URL, the invitation id, B's one-time X25519 public key and a
32-byte one-time secret. A sends its own X25519 public key with a proof (HMAC of the transcript keyed with the
secret); both sides compute X25519, then HKDF-SHA256 (salt: the secret; info: a label and the transcript) into two
keys: k_ab, A's token at B, and k_ba, B's token at A. Tokens are never sent; B proves it derived the same keys with a
key confirmation MAC under k_ba. `cryptography`'s primitives are used (maintained, OpenSSL-backed, constant time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CODE_PREFIX = "avi_"
INFO_LABEL = b"agentvault-federation-v1"
PROOF_LABEL = b"agentvault-federation-v1 proof"
CONFIRM_LABEL = b"agentvault-federation-v1 confirm"
KEY_BYTES = 32
SECRET_BYTES = 32
MAX_CODE_LENGTH = 2048
MAX_URL_LENGTH = 500
CREDENTIAL_ID_HEX = 16
TOKEN_PREFIX = "avf"  # noqa: S105 - the public prefix of federation tokens, not a secret
# The name of the peer mesh an invitation is for (it names the credential issued on redemption, hence the same rule
# as federation credentials' names).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")
DEFAULT_TTL = 3600
MAX_TTL = 7 * 86_400


class InvitationCodeError(ValueError):
    """The code is not one a mesh of this project issued; the text is safe to show."""


@dataclass(frozen=True)
class InvitationCode:
    registry_url: str
    invitation_id: str
    public_key: bytes  # the inviting mesh's X25519 public key
    secret: bytes  # the one-time secret

    def encode(self) -> str:
        doc = {
            "v": 1,
            "u": self.registry_url,
            "i": self.invitation_id,
            "k": _b64(self.public_key),
            "s": _b64(self.secret),
        }
        return CODE_PREFIX + _b64(json.dumps(doc, separators=(",", ":")).encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not isinstance(text, str) or len(text) > MAX_CODE_LENGTH:
        raise InvitationCodeError("the invitation code is malformed")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise InvitationCodeError("the invitation code is malformed") from None


def decode_code(code: str) -> InvitationCode:
    """Parses and checks a code's form (lengths, UUID, URL scheme); raises InvitationCodeError."""
    code = code.strip()
    if not code.startswith(CODE_PREFIX) or len(code) > MAX_CODE_LENGTH:
        raise InvitationCodeError(f"must be an invitation code starting with {CODE_PREFIX}")
    try:
        doc = json.loads(_unb64(code[len(CODE_PREFIX) :]))
    except ValueError:
        raise InvitationCodeError("the invitation code is malformed") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise InvitationCodeError("the invitation code is malformed or of an unknown version")
    url, inv_id, key, secret = doc.get("u"), doc.get("i"), doc.get("k"), doc.get("s")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > MAX_URL_LENGTH:
        raise InvitationCodeError("the invitation code names no valid registry URL")
    try:
        inv_id = str(uuid.UUID(str(inv_id)))
    except ValueError:
        raise InvitationCodeError("the invitation code holds no valid invitation id") from None
    public_key, one_time = _unb64(str(key)), _unb64(str(secret))
    if len(public_key) != KEY_BYTES or len(one_time) != SECRET_BYTES:
        raise InvitationCodeError("the invitation code holds a key or secret of the wrong length")
    return InvitationCode(url.rstrip("/"), inv_id, public_key, one_time)


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, public_bytes(private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def new_credential_id() -> str:
    return secrets.token_hex(CREDENTIAL_ID_HEX // 2)


def is_credential_id(value: str) -> bool:
    return len(value) == CREDENTIAL_ID_HEX and all(c in "0123456789abcdef" for c in value)


def transcript(
    invitation_id: str, inviter_key: bytes, invitee_key: bytes, inviter_url: str, invitee_url: str, cred_ba: str
) -> bytes:
    """Everything both sides agree on, each part length-prefixed so no two transcripts share an encoding."""
    parts = (invitation_id.encode(), inviter_key, invitee_key, inviter_url.encode(), invitee_url.encode())
    return b"".join(len(p).to_bytes(4, "big") + p for p in (*parts, cred_ba.encode()))


def proof(secret: bytes, transcript_bytes: bytes) -> bytes:
    return hmac.new(secret, PROOF_LABEL + transcript_bytes, hashlib.sha256).digest()


def proof_matches(secret: bytes, transcript_bytes: bytes, presented: bytes) -> bool:
    return hmac.compare_digest(proof(secret, transcript_bytes), presented)


@dataclass(frozen=True)
class DerivedKeys:
    k_ab: bytes  # the invitee's (A's) token secret at the inviter (B)
    k_ba: bytes  # the inviter's (B's) token secret at the invitee (A)


class KeyAgreementError(ValueError):
    """The peer's public key is not usable (e.g. a low-order point giving an all-zero shared secret)."""


def derive(private: X25519PrivateKey, peer_public: bytes, secret: bytes, transcript_bytes: bytes) -> DerivedKeys:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        # cryptography refuses an all-zero result (RFC 7748 6.1's check).
        raise KeyAgreementError("the public key is not a usable X25519 key") from None
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=secret, info=INFO_LABEL + transcript_bytes).derive(
        shared
    )
    return DerivedKeys(okm[:KEY_BYTES], okm[KEY_BYTES:])


def token(credential_id: str, key: bytes) -> str:
    """The federation token `avf_<id>_<secret>` a derived key stands for (the form every federation token has)."""
    return f"{TOKEN_PREFIX}_{credential_id}_{_b64(key)}"


def confirmation(k_ba: bytes, transcript_bytes: bytes, cred_ab: str) -> bytes:
    return hmac.new(k_ba, CONFIRM_LABEL + transcript_bytes + cred_ab.encode(), hashlib.sha256).digest()


def confirmation_matches(k_ba: bytes, transcript_bytes: bytes, cred_ab: str, presented: bytes) -> bool:
    return hmac.compare_digest(confirmation(k_ba, transcript_bytes, cred_ab), presented)
