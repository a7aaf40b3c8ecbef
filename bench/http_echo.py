"""The HTTP floor: a bare aiohttp server answering every GET with a fixed JSON body (no routing table, no backend).

Run as `python -m bench.http_echo PORT`. Whatever an edge request costs beyond this is the edge's own (routing,
the gRPC call, JSON encoding); with the gRPC echo it gives the least CPU a request through an HTTP edge in front of
a gRPC service can cost in this stack.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from bench.procs import run_loop

# About the size of one agent as the edge prints it.
BODY = json.dumps({"id": "0" * 36, "name": "x" * 40, "description": "y" * 400, "tags": ["a", "b"]}).encode()


async def answer(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until the benchmark terminates the process


def main() -> None:
    run_loop(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
