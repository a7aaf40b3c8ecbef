"""`python -m bench.tools_bench [--quick]`: issue 13's tool figures: a tool call through the mesh vs direct MCP.

All on 127.0.0.1 in a temporary folder: embedded PostgreSQL and Redis, the mesh's services as real processes, and a
real MCP server (the SDK's MCPServer, FastMCP's successor, over streamable HTTP under uvicorn, in a process of its
own: this module with `--serve`) holding a fast tool (`echo`) and a progress tool (`progress`: one progress
notification at once, then its result). The server is registered as an agent with a bearer token; a permit policy
for tool.list and tool.invoke; an OAuth client (tools:invoke) whose token the mesh calls carry.

Every row is one call in flight, sequential, after a warm-up that is excluded; p50/p99 at the caller.

1. direct, one session: the `mcp` client's call_tool of `echo` on a session opened once (a client's steady state).
   This is the ceiling: the same call, the same server, no mesh.
2. direct, session per call: connect + initialize + call_tool + close, each call: what a client without a pool of
   sessions pays (the mesh keeps a pool per agent and credentials, tools/pool.py), for reading the gap.
3. mesh gRPC: ToolService.InvokeTool (server streaming) of the same tool, read to its result. The difference to (1)
   at p50 is judged: goal within 2 ms.
4. mesh /mcp: the SDK's client on a session with the edge's /mcp (stateless), call_tool of the same tool; the
   same goal against (1).
5. first progress: the time from the call to its first progress notification, for `progress`, direct (one
   session), through InvokeTool (the first progress event) and through the edge's /mcp.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx2
from google.protobuf import struct_pb2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import Mesh
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.messaging.v1 import tool_service_pb2_grpc as tpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from bench.identity_bench import basic, bearer
from bench.load import percentile
from bench.messaging_bench import infrastructure, on_uvloop
from bench.procs import machine, sigterm_as_interrupt
from bench.report import Figure, judge, table, write_json
from bench.suite import REPO, _create_database

SECTION = "tools"
# The goal. It lives here, in the benchmark, and never in the tests.
MESH_OVER_DIRECT_P50_MS = 2.0
POLICIES = (
    'permit(principal, action == Action::"tool.list", resource);',
    'permit(principal, action == Action::"tool.invoke", resource);',
)
CALL_TIMEOUT = 30.0
ECHO_ARGS = {"text": "hello from the bench"}


# The MCP server (its own process) ------------------------------------------------------------------------------


def serve(port: int, token: str) -> None:
    import uvicorn

    server = MCPServer("bench-tools")

    @server.tool()
    def echo(text: str) -> str:
        """Returns its text."""
        return text

    @server.tool()
    async def progress(ctx: Context) -> str:
        """Reports one progress notification at once, then answers."""
        await ctx.report_progress(1, 1, "started")
        return "done"

    expected = f"Bearer {token}".encode()
    inner = server.streamable_http_app()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # As a real tool server would: only the mesh's (or the direct caller's) credential for it.
        if scope["type"] == "http" and not hmac.compare_digest(
            dict(scope["headers"]).get(b"authorization", b""), expected
        ):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await inner(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_server(port: int, token: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.tools_bench", "--serve", str(port), token], cwd=REPO)
    url = f"http://127.0.0.1:{port}/mcp"

    async def ready() -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                if proc.poll() is not None:
                    break
                try:
                    async with http.get(url) as answer:  # 401 without the token: it is up
                        if answer.status:
                            return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        raise RuntimeError("the bench's MCP server did not start")

    asyncio.run(ready())
    return proc


@asynccontextmanager
async def mcp_session(url: str, token: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


# Measuring ----------------------------------------------------------------------------------------------------


async def timed(call: Callable[[], Awaitable[float | None]], warmup: int, rounds: int) -> list[float]:
    """Seconds per call (or what the call returns, when it measures a part of itself), the warm-up left out."""
    out = []
    for i in range(warmup + rounds):
        started = time.perf_counter()
        part = await call()
        elapsed = part if part is not None else time.perf_counter() - started
        if i >= warmup:
            out.append(elapsed)
    return out


def figure(name: str, values: list[float], note: str) -> Figure:
    ordered = sorted(values)
    return Figure(
        SECTION,
        name,
        throughput=len(values) / max(sum(values), 1e-9),
        p50_ms=percentile(ordered, 0.5) * 1000,
        p99_ms=percentile(ordered, 0.99) * 1000,
        note=note,
    )


def args(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def measure(
    mesh: Mesh, server_url: str, server_token: str, agent_id: str, token: str, warmup: int, rounds: int
) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    note = f"{rounds} calls, one in flight, {warmup} warm-up calls excluded"

    # (1) and (5) direct, one session.
    async with mcp_session(server_url, server_token) as session:

        async def direct() -> None:
            result = await session.call_tool("echo", ECHO_ARGS)
            assert not result.is_error

        figures["direct"] = figure(
            "direct MCP call_tool, one session (ceiling)", await timed(direct, warmup, rounds), note
        )

        async def direct_progress() -> float:
            started = time.perf_counter()
            first: list[float] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                if not first:
                    first.append(time.perf_counter() - started)

            await session.call_tool("progress", {}, progress_callback=on_progress)
            return first[0]

        figures["direct_progress"] = figure(
            "first progress, direct MCP", await timed(direct_progress, warmup, rounds), note
        )

    # (2) direct, a session per call.
    async def per_call() -> None:
        async with mcp_session(server_url, server_token) as fresh:
            result = await fresh.call_tool("echo", ECHO_ARGS)
            assert not result.is_error

    figures["per_call"] = figure(
        "direct MCP, new session per call (connect+initialize+call)", await timed(per_call, warmup, rounds), note
    )

    # (3) and (5) through the mesh over gRPC.
    md = bearer(token)
    async with grpc.aio.insecure_channel(mesh.address("messaging")) as channel:
        tools = tpb_grpc.ToolServiceStub(channel)
        request = tpb.InvokeToolRequest(agent_id=agent_id, tool="echo", arguments=args(ECHO_ARGS))

        async def via_grpc() -> None:
            events = [e async for e in tools.InvokeTool(request, metadata=md, timeout=CALL_TIMEOUT)]
            if events[-1].WhichOneof("event") != "result" or events[-1].result.is_error:
                raise RuntimeError(f"the tool call failed: {events}")

        figures["grpc"] = figure("mesh: ToolService.InvokeTool over gRPC", await timed(via_grpc, warmup, rounds), note)
        progress_request = tpb.InvokeToolRequest(agent_id=agent_id, tool="progress", arguments=args({}))

        async def grpc_progress() -> float:
            started = time.perf_counter()
            first = None
            async for event in tools.InvokeTool(progress_request, metadata=md, timeout=CALL_TIMEOUT):
                if first is None and event.WhichOneof("event") == "progress":
                    first = time.perf_counter() - started
            assert first is not None
            return first

        figures["grpc_progress"] = figure(
            "first progress, mesh InvokeTool (gRPC)", await timed(grpc_progress, warmup, rounds), note
        )

    # (4) and (5) through the edge's /mcp.
    name = f"{agent_id}.echo"
    async with mcp_session(mesh.url("/mcp"), token) as edge:

        async def via_edge() -> None:
            result = await edge.call_tool(name, ECHO_ARGS)
            assert not result.is_error, result

        figures["edge"] = figure("mesh: edge /mcp call_tool (SDK client)", await timed(via_edge, warmup, rounds), note)

        async def edge_progress() -> float:
            started = time.perf_counter()
            first: list[float] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                if not first:
                    first.append(time.perf_counter() - started)

            await edge.call_tool(f"{agent_id}.progress", {}, progress_callback=on_progress)
            return first[0]

        figures["edge_progress"] = figure(
            "first progress, mesh edge /mcp", await timed(edge_progress, warmup, rounds), note
        )
    return figures


# Setting up ---------------------------------------------------------------------------------------------------


async def prepare(mesh: Mesh, admin_token: str, server_url: str, server_token: str) -> tuple[str, str]:
    """The policies, the MCP server as an agent, a caller's token; waits until the mesh lists the tools."""
    admin = bearer(admin_token)
    async with grpc.aio.insecure_channel(mesh.address("registry")) as channel:
        registry = pb_grpc.RegistryServiceStub(channel)
        identity = ipb_grpc.IdentityServiceStub(channel)
        policies = ppb_grpc.PolicyServiceStub(channel)
        for i, text in enumerate(POLICIES):
            policy = ppb.Policy(name=f"bench-tools-{i}", text=text, enabled=True)
            await policies.CreatePolicy(ppb.CreatePolicyRequest(policy=policy), metadata=admin)
        agent = await registry.CreateAgent(
            pb.CreateAgentRequest(
                agent=pb.Agent(
                    did=f"did:web:bench.example:mcp-{secrets.token_hex(6)}",
                    name="bench tools",
                    version="1.0.0",
                    sharing=pb.SHARING_LOCAL,
                    endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_MCP, url=server_url)],
                    auth=pb.AgentAuth(kind=pb.AGENT_AUTH_KIND_BEARER, bearer_token=server_token),
                )
            ),
            metadata=admin,
        )
        created = await identity.CreateOAuthClient(
            ipb.CreateOAuthClientRequest(name="bench-tool-caller", scopes=["agents:read", "tools:invoke"]),
            metadata=admin,
        )
        reply = await identity.Token(
            ipb.TokenRequest(
                form={"grant_type": "client_credentials"},
                authorization_header=basic(created.client.client_id, created.client_secret),
                source="127.0.0.1",
            )
        )
        if reply.http_status != 200:
            raise RuntimeError(f"the token endpoint refused the bench's client: {reply.json_body}")
        token = json.loads(reply.json_body)["access_token"]
    async with grpc.aio.insecure_channel(mesh.address("messaging")) as channel:
        tools = tpb_grpc.ToolServiceStub(channel)
        deadline = time.monotonic() + 60
        while True:  # the catalog's first sync, and the policy set reaching messaging
            listed = await tools.ListTools(tpb.ListToolsRequest(agent_id=agent.id), metadata=bearer(token))
            if {"echo", "progress"} <= {t.name for t in listed.tools}:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the mesh did not list the bench's tools: {listed}")
            await asyncio.sleep(0.1)
    return agent.id, token


def run(rounds: int, warmup: int, output: Path) -> int:
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}; "
          f"load average at start {info['load_average_at_start']}; {rounds} calls per row, {warmup} warm-up",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="agentvault-tools-") as tmp, infrastructure(Path(tmp)) as infra:
        postgres, redis = infra
        asyncio.run(_create_database(postgres.uri(), "bench"))
        admin_token = "bench-admin-" + secrets.token_urlsafe(16)
        edge_port = free_port()
        env = {
            "DATABASE_URL": postgres.uri("bench"),
            "REDIS_URL": redis.url(0),
            "AGENTVAULT_ADMIN_TOKEN": admin_token,
            "AGENTVAULT_DATA_DIR": str(Path(tmp) / "data"),
            "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
            "EDGE_PORT": str(edge_port),
            "OAUTH_ISSUER": f"http://127.0.0.1:{edge_port}",
            "TOOLS_CATALOG_SCAN_SECONDS": "0.5",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "WARNING",
        }
        server_port, server_token = free_port(), secrets.token_urlsafe(16)
        server_url = f"http://127.0.0.1:{server_port}/mcp"
        server = start_server(server_port, server_token)
        mesh = Mesh(env, log_dir=Path(tmp) / "logs")
        try:
            mesh.start(timeout=90)
            agent_id, token = asyncio.run(prepare(mesh, admin_token, server_url, server_token))
            found = on_uvloop(measure(mesh, server_url, server_token, agent_id, token, warmup, rounds))
        finally:
            mesh.stop()
            server.terminate()
            server.wait(10)
    base = found["direct"].p50_ms or 0.0
    for key in ("grpc", "edge"):
        f = found[key]
        over = (f.p50_ms or 0.0) - base
        f.extra["over_direct_p50_ms"] = over
        f.note = f"{over:+.2f} ms p50 over the direct call (one session); {f.note}"
        judge(f, f"p50 within {MESH_OVER_DIRECT_P50_MS:g} ms of direct", over <= MESH_OVER_DIRECT_P50_MS)
    per_call = found["per_call"]
    per_call.note = f"{(per_call.p50_ms or 0) - base:+.2f} ms p50 over one session; {per_call.note}"
    first = found["direct_progress"].p50_ms or 0.0
    for key in ("grpc_progress", "edge_progress"):
        f = found[key]
        f.note = f"{(f.p50_ms or 0) - first:+.2f} ms p50 over direct; {f.note}"
    order = ("direct", "per_call", "grpc", "edge", "direct_progress", "grpc_progress", "edge_progress")
    figures = [found[k] for k in order]
    print("\n" + table(figures))
    payload = {
        "machine": info,
        "rounds": rounds,
        "warmup": warmup,
        "goals": {"over_direct_p50_ms": MESH_OVER_DIRECT_P50_MS},
    }
    write_json(output, payload, figures)
    print(f"\nfigures written to {output}")
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.tools_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="50 calls per row instead of 300")
    parser.add_argument("--rounds", type=int, help="calls measured per row (default 300, quick 50)")
    parser.add_argument("--warmup", type=int, default=20, help="calls left out first, per row (20)")
    parser.add_argument("--output", type=Path, default=REPO / ".build" / "bench" / "tools.json")
    args = parser.parse_args()
    with sigterm_as_interrupt():
        sys.exit(run(args.rounds or (50 if args.quick else 300), args.warmup, args.output))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
