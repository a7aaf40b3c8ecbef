"""HMAC-SHA256 request signatures between meshes, as the federation seed defines them, plus a nonce.

The signed message is `METHOD\\nPATH\\nBODY\\nTIMESTAMP` (the seed's form); when a nonce is sent it is appended
as a fifth line, so two identical requests in the same second still have different signatures and replay
protection can key on the signature alone. The header value is `<timestamp>.<hex digest>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SIGNATURE_HEADER = "x-federation-signature"
NONCE_HEADER = "x-federation-nonce"
REGISTRY_HEADER = "x-federation-registry"
# gRPC calls are signed with this method and the full method name as the path; the body is the
# base64 of the request's deterministic serialization.
GRPC_METHOD = "GRPC"
MAX_FUTURE_SKEW_SECONDS = 30
MAX_NONCE_LENGTH = 64


class SignatureError(ValueError):
    """Why a signature was rejected; the text is safe to return to the caller."""


def _message(method: str, path: str, body: str, timestamp: str, nonce: str) -> bytes:
    message = f"{method}\n{path}\n{body}\n{timestamp}"
    if nonce:
        message += f"\n{nonce}"
    return message.encode()


def sign(method: str, path: str, body: str, secret: str, *, timestamp: int | None = None, nonce: str = "") -> str:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), _message(method, path, body, ts, nonce), hashlib.sha256).hexdigest()
    return f"{ts}.{digest}"


def new_nonce() -> str:
    return secrets.token_hex(16)


def grpc_body(serialized: bytes) -> str:
    return base64.b64encode(serialized).decode()


@dataclass(frozen=True)
class Verified:
    timestamp: int
    signature: str


def verify(
    signature: str,
    method: str,
    path: str,
    body: str,
    secret: str,
    *,
    max_age: int,
    nonce: str = "",
    now: float | None = None,
) -> Verified:
    """Checks the signature in constant time; raises SignatureError saying what is wrong."""
    if len(signature) > 200 or len(nonce) > MAX_NONCE_LENGTH:
        raise SignatureError("malformed signature")
    ts_text, dot, digest = signature.partition(".")
    if not dot or not ts_text.isdigit() or len(digest) != 64:
        raise SignatureError("malformed signature: expected <timestamp>.<hex sha256>")
    timestamp = int(ts_text)
    current = time.time() if now is None else now
    if current - timestamp > max_age:
        raise SignatureError(f"signature expired (older than {max_age}s)")
    if timestamp - current > MAX_FUTURE_SKEW_SECONDS:
        raise SignatureError("signature timestamp is in the future")
    expected = hmac.new(secret.encode(), _message(method, path, body, ts_text, nonce), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(digest.encode(), expected.encode()):
        raise SignatureError("signature does not match")
    return Verified(timestamp, signature)
