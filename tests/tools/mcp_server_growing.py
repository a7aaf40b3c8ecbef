"""An MCP server whose tools grow at runtime (GET /grow?name=...), telling its sessions (tools/list_changed)."""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from mcp.server import MCPServer
from mcp_server import BearerOnly  # type: ignore[import-not-found]  # the sibling script, run from its folder
from starlette.responses import JSONResponse

# The MCP sessions (by Mcp-Session-Id) that have listed the tools, each with the session object of its latest request
# (one per request: it sends on the session's stream), held until telling one fails: the ones to tell when the
# list changes (the SDK keeps no such list).
SESSIONS: dict[str, Any] = {}
# How many distinct MCP sessions have listed the tools since the start (a client's session per watched registration).
SEEN = {"sessions": 0}


class GrowingServer(MCPServer):
    async def _handle_list_tools(self, ctx: Any, params: Any) -> Any:
        key = ctx.request.headers.get("mcp-session-id", "") if ctx.request is not None else ""
        if key not in SESSIONS:
            SEEN["sessions"] += 1
        SESSIONS[key] = ctx.session
        return await super()._handle_list_tools(ctx, params)


server = GrowingServer("growing-tools")


@server.tool()
def base(text: str) -> str:
    """The tool present from the start."""
    return text


@server.custom_route("/grow", methods=["GET"])
async def grow(request: Any) -> Any:
    name = request.query_params["name"]

    def added(text: str) -> str:
        return f"{name}: {text}"

    server.add_tool(added, name=name, description=f"added at runtime as {name}")
    told = 0
    for key, session in list(SESSIONS.items()):
        try:
            await session.send_tool_list_changed()
            told += 1
        except Exception as exc:  # a session that has gone away
            print(f"cannot tell a session: {exc!r}", file=sys.stderr)
            SESSIONS.pop(key, None)
    return JSONResponse({"told": told, "sessions": len(SESSIONS)})


@server.custom_route("/seen", methods=["GET"])
async def seen(request: Any) -> Any:
    return JSONResponse(SEEN)


def main() -> None:
    port, token = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(BearerOnly(server.streamable_http_app(), token), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
