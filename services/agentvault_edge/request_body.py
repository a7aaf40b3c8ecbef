"""An HTTP request's JSON body: read within a size and time limit, parsed strictly (no duplicate keys, no NaN)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from agentvault_edge import errors
from agentvault_edge.routes import Route


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys silently; which one a client meant is unknowable.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole body, at most `limit` bytes, within `timeout` seconds."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    # Read in pieces rather than request.read(): a chunked body has no Content-Length to check first.
    # The whole body within one deadline: a client trickling bytes cannot hold a connection and a task.
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise errors.body_too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise errors.body_timeout(timeout) from None
    return b"".join(chunks)


def parse_body(request: web.Request, route: Route, raw: bytes) -> Any:
    """The JSON body as Python values; None when there is none."""
    if not raw.strip():
        return None
    if not route.body:
        raise errors.bad_request("", f"{route.http_method} {route.template.source} takes no request body")
    content_type = request.headers.get("Content-Type")
    if content_type:
        mime = content_type.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise errors.unsupported_media_type(mime)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.bad_request("", "the request body is not valid UTF-8") from None
    return parse_json(text)


def parse_json(text: str) -> Any:
    """JSON text as Python values (a body, or a WebSocket frame); anything malformed is a 400 EdgeError."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_object_without_duplicates)
    except _DuplicateKey as exc:
        raise errors.bad_request(exc.key, "appears twice in the same JSON object") from None
    except RecursionError:
        raise errors.bad_request("", "malformed JSON: nested too deeply") from None
    except ValueError as exc:
        raise errors.bad_request("", f"malformed JSON: {exc}") from None
