"""Request signing and secret encryption: what is accepted, and everything that must not be."""

from __future__ import annotations

import time

import pytest

from agentvault.common import signing
from agentvault.common.secretbox import DecryptionError, SecretBox
from agentvault.common.settings import SettingsError


def test_signature_roundtrip_and_rejections() -> None:
    now = int(time.time())
    sig = signing.sign("GET", "/api/v1/agents?search=nlp", "", "tok", timestamp=now, nonce="n1")
    assert signing.verify(sig, "GET", "/api/v1/agents?search=nlp", "", "tok", max_age=300, nonce="n1").timestamp == now
    cases = [
        dict(signature=sig, method="POST"),
        dict(signature=sig, path="/api/v1/agents?search=other"),
        dict(signature=sig, body="x"),
        dict(signature=sig, secret="other"),
        dict(signature=sig, nonce="n2"),
        dict(signature="garbage"),
        dict(signature=f"{now}.{'0' * 64}"),
        dict(signature=signing.sign("GET", "/p", "", "tok", timestamp=now - 301, nonce="n1"), path="/p"),
        dict(signature=signing.sign("GET", "/p", "", "tok", timestamp=now + 120, nonce="n1"), path="/p"),
    ]
    for case in cases:
        args = {"method": "GET", "path": "/api/v1/agents?search=nlp", "body": "", "secret": "tok", "nonce": "n1"}
        args.update(case)
        with pytest.raises(signing.SignatureError):
            signing.verify(
                args["signature"],
                args["method"],
                args["path"],
                args["body"],
                args["secret"],
                max_age=300,
                nonce=args["nonce"],
            )


def test_seed_form_without_nonce_matches_the_seed_message() -> None:
    import hashlib
    import hmac

    sig = signing.sign("GET", "/p", "b", "secret", timestamp=1700000000)
    expected = hmac.new(b"secret", b"GET\n/p\nb\n1700000000", hashlib.sha256).hexdigest()
    assert sig == f"1700000000.{expected}"


def test_secretbox_rotation() -> None:
    old, new = SecretBox.generate_key(), SecretBox.generate_key()
    ciphertext = SecretBox([old]).encrypt("peer-token")
    assert "peer-token" not in ciphertext
    rotated_box = SecretBox([new, old])
    assert rotated_box.decrypt(ciphertext) == "peer-token"
    rotated = rotated_box.rotate(ciphertext)
    assert SecretBox([new]).decrypt(rotated) == "peer-token"
    with pytest.raises(DecryptionError):
        SecretBox([new]).decrypt(ciphertext)
    with pytest.raises(SettingsError):
        SecretBox(["not-a-key"])
    with pytest.raises(SettingsError):
        SecretBox([])
