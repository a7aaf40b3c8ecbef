"""The edge's JSON responses: a body of any JSON value, and the error body of an EdgeError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from agentvault_edge import errors
from agentvault_edge.json_out import dumps


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=dumps(payload), status=status, content_type="application/json", charset="utf-8", headers=headers
    )


def error_response(exc: errors.EdgeError) -> web.Response:
    response = json_response(exc.body(), exc.http_status, exc.headers)
    if exc.close_connection:
        response.force_close()
    return response
