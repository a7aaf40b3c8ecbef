"""The invitation handshake's primitives: codes are parsed strictly, both sides derive the same two keys only from
the same transcript, and an unusable public key is refused."""

from __future__ import annotations

import base64
import json

import pytest

from agentvault.common import invitations as hs

INVITATION_ID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def code_of(doc: object) -> str:
    return hs.CODE_PREFIX + base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def test_a_code_round_trips_and_bad_ones_are_refused() -> None:
    _, public = hs.new_key_pair()
    code = hs.InvitationCode("https://b.example", INVITATION_ID, public, hs.new_secret())
    assert hs.decode_code(code.encode()) == code
    assert hs.decode_code(" " + code.encode() + "\n") == code  # pasted with whitespace
    good = {"v": 1, "u": "https://b.example", "i": INVITATION_ID, "k": "A" * 43, "s": "A" * 43}
    for bad in (
        "",
        "avf_0123456789abcdef_secret",  # a token is not a code
        "avi_***",
        "avi_" + "A" * 5000,
        code_of([1, 2]),
        code_of({**good, "v": 2}),
        code_of({**good, "u": "ftp://b.example"}),
        code_of({**good, "u": 5}),
        code_of({**good, "i": "not-a-uuid"}),
        code_of({**good, "k": "AAAA"}),  # a key of the wrong length
        code_of({**good, "s": "A" * 50}),
        code_of({k: v for k, v in good.items() if k != "s"}),
    ):
        with pytest.raises(hs.InvitationCodeError):
            hs.decode_code(bad)


def test_both_sides_derive_the_same_keys_from_the_same_transcript_only() -> None:
    b_private, b_public = hs.new_key_pair()
    a_private, a_public = hs.new_key_pair()
    secret = hs.new_secret()
    transcript = hs.transcript(INVITATION_ID, b_public, a_public, "https://b.example", "https://a.example", "0" * 16)
    on_a = hs.derive(a_private, b_public, secret, transcript)
    on_b = hs.derive(hs.load_private(hs.private_bytes(b_private)), a_public, secret, transcript)
    assert on_a == on_b and on_a.k_ab != on_a.k_ba and len(on_a.k_ab) == len(on_a.k_ba) == 32
    # Any other transcript (here: another URL for A) or secret gives other keys.
    other = hs.transcript(INVITATION_ID, b_public, a_public, "https://b.example", "https://evil.example", "0" * 16)
    assert hs.derive(a_private, b_public, secret, other) != on_a
    assert hs.derive(a_private, b_public, hs.new_secret(), transcript) != on_a
    # The proof and the key confirmation verify only what they were made for.
    assert hs.proof_matches(secret, transcript, hs.proof(secret, transcript))
    assert not hs.proof_matches(secret, other, hs.proof(secret, transcript))
    confirmation = hs.confirmation(on_b.k_ba, transcript, "f" * 16)
    assert hs.confirmation_matches(on_a.k_ba, transcript, "f" * 16, confirmation)
    assert not hs.confirmation_matches(on_a.k_ab, transcript, "f" * 16, confirmation)
    assert not hs.confirmation_matches(on_a.k_ba, transcript, "e" * 16, confirmation)
    token = hs.token("0" * 16, on_a.k_ab)
    assert token.startswith("avf_" + "0" * 16 + "_") and len(token) == 4 + 16 + 1 + 43


def test_length_prefixes_keep_transcripts_apart() -> None:
    # Without them, ("ab", "c") and ("a", "bc") would be the same bytes.
    one = hs.transcript(INVITATION_ID, b"k" * 32, b"k" * 32, "https://ab", "c", "0" * 16)
    two = hs.transcript(INVITATION_ID, b"k" * 32, b"k" * 32, "https://a", "bc", "0" * 16)
    assert one != two


def test_a_low_order_public_key_is_refused() -> None:
    private, _ = hs.new_key_pair()
    with pytest.raises(hs.KeyAgreementError):
        hs.derive(private, b"\x00" * 32, hs.new_secret(), b"transcript")
