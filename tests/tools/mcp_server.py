"""A real MCP server for the tool tests: the mcp SDK's MCPServer over streamable HTTP under uvicorn on loopback."""

from __future__ import annotations

import asyncio
import hmac
import sys
from typing import Any

import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer("test-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
async def slow(steps: int, ctx: Context) -> str:
    """Count to steps, reporting progress after each."""
    for i in range(1, steps + 1):
        await asyncio.sleep(0.05)
        await ctx.report_progress(i, steps, f"step {i}")
    return f"counted to {steps}"


@server.tool()
def fail(why: str) -> str:
    """Always fails: the tool's own error."""
    raise ValueError(f"failed on purpose: {why}")


# What the hang tool saw: started, and cancelled (the client's notifications/cancelled reached it).
SEEN = {"hang_started": 0, "hang_cancelled": 0}


@server.tool()
async def hang(ctx: Context) -> str:
    """Never returns on its own: for deadlines and cancellation."""
    SEEN["hang_started"] += 1
    try:
        await asyncio.sleep(3600)
    except BaseException:
        SEEN["hang_cancelled"] += 1
        raise
    return "never"


# Sessions opened (initialize requests: a POST without a session id) per label of the bearer token ("token.label";
# "" for the bare token): tests of the mesh's session reuse register agents with their own label.
SESSIONS: dict[str, int] = {}


@server.custom_route("/seen", methods=["GET"])
async def seen(request: Any) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({**SEEN, "sessions": SESSIONS})


class BearerOnly:
    """Refuses requests without the expected bearer token (optionally followed by ".label"): the mesh must call with
    its own credentials for us."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            given, _, label = headers.get(b"authorization", b"").partition(b".")
            if not hmac.compare_digest(given, self.expected):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
            if scope["method"] == "POST" and scope["path"] == "/mcp" and b"mcp-session-id" not in headers:
                name = label.decode(errors="replace")
                SESSIONS[name] = SESSIONS.get(name, 0) + 1
        await self.app(scope, receive, send)


def main() -> None:
    port, token = int(sys.argv[1]), sys.argv[2]
    app = BearerOnly(server.streamable_http_app(), token)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
