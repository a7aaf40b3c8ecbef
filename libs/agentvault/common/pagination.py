"""Opaque page tokens (AIP-158): the position of the last item, bound to the query that produced it."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from agentvault.common.errors import invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_MAX_TOKEN = 1024


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """The documented default for 0, the maximum for anything larger; negative sizes are an error."""
    if requested < 0:
        raise invalid("page_size", "must not be negative")
    if requested == 0:
        return default
    return min(requested, maximum)


def _bind(query_fingerprint: str) -> str:
    return hashlib.sha256(query_fingerprint.encode()).hexdigest()[:16]


def encode(position: list[Any], query_fingerprint: str) -> str:
    raw = json.dumps({"q": _bind(query_fingerprint), "p": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, query_fingerprint: str) -> list[Any] | None:
    """The position in `token`, None for the first page; a token from another query is rejected."""
    if not token:
        return None
    if len(token) > _MAX_TOKEN:
        raise invalid("page_token", "is not a valid page token")
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        bound, position = data["q"], data["p"]
    except (ValueError, KeyError, TypeError):
        raise invalid("page_token", "is not a valid page token") from None
    if bound != _bind(query_fingerprint) or not isinstance(position, list):
        raise invalid("page_token", "belongs to a different query; keep the other parameters unchanged")
    return position


def time_and_id(after: list[Any]) -> tuple[datetime, str]:
    """The (created_at, id) keyset position of a decoded page token, for lists ordered newest first; a token
    whose position is not one is INVALID_ARGUMENT, like any other bad token."""
    if len(after) != 2:
        raise invalid("page_token", "is not a valid page token")
    try:
        return datetime.fromisoformat(str(after[0])), str(after[1])
    except ValueError:
        raise invalid("page_token", "is not a valid page token") from None


class _Dated(Protocol):
    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> Any: ...


D = TypeVar("D", bound=_Dated)


def page_of(rows: Sequence[D], size: int, query_fingerprint: str) -> tuple[list[D], str]:
    """A page of a list ordered newest first by (created_at, id), fetched with one row more than `size`: the page
    and the token of the next one ("" on the last page)."""
    if len(rows) <= size:
        return list(rows), ""
    last = rows[size - 1]
    return list(rows[:size]), encode([last.created_at.isoformat(), str(last.id)], query_fingerprint)
