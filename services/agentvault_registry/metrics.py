"""The registry's Prometheus metrics for the authorization server (the token endpoint)."""

from __future__ import annotations

from prometheus_client import Counter

from agentvault.common.oauth import GRANT_TYPES

OAUTH_TOKENS = Counter(
    "oauth_tokens_total",
    "Token endpoint answers, by grant type and result: issued, or the RFC 6749 error code it was refused with.",
    ["grant_type", "result"],
)


def token_answered(grant_type: str, result: str) -> None:
    # A client may send any grant_type: only the known ones become labels, so the series stay few.
    OAUTH_TOKENS.labels(grant_type if grant_type in GRANT_TYPES else "other", result).inc()
