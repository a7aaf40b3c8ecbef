"""The mesh as an MCP server at /mcp (streamable HTTP): tools/list is ListTools, tools/call is InvokeTool.

The MCP SDK is imported on the first /mcp request, not at start: it costs some 3 s of CPU to import (half of the
edge's start on a busy 2-core machine), which an edge that never serves /mcp should not pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, cast

import grpc
from aiohttp import web
from google.protobuf import json_format, struct_pb2

from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.messaging.v1 import tool_service_pb2_grpc as tpb_grpc
from agentvault_edge import errors
from agentvault_edge.backends import Backends
from agentvault_edge.forwarding import forwarded_metadata
from agentvault_edge.request_body import read_body
from agentvault_edge.settings import EdgeSettings

if TYPE_CHECKING:
    import mcp_types as types
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from mcp.shared.exceptions import MCPError

log = logging.getLogger(__name__)

PATH = "/mcp"
# Where the bridge leaves the caller's forwarded gRPC metadata in the ASGI scope, for the handlers.
METADATA_KEY = "agentvault.metadata"
# An MCP tool's name at /mcp: the agent's id, a dot, the tool's name (a UUID holds no dot, so the first splits).
SEPARATOR = "."
UNAUTHENTICATED = -32001
_NAME = re.compile(
    r"(?:(?P<mesh>[A-Za-z0-9._-]+?)\.)?(?P<agent>[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})\.(?P<tool>.+)",
    re.S,
)
# MCP's tool-name rule: a peer mesh whose name breaks it keeps its tools off /mcp (ListTools still shows them).
_MESH_NAME = re.compile(r"[A-Za-z0-9._-]+")


def mcp_name(agent_id: str, tool: str, mesh: str = "") -> str:
    """`<agent_id>.<tool>`; a tool of a peer mesh `<mesh>.<agent_id>.<tool>` (MCP names allow only [A-Za-z0-9._-]:
    no `/`)."""
    return f"{mesh}{SEPARATOR}{agent_id}{SEPARATOR}{tool}" if mesh else f"{agent_id}{SEPARATOR}{tool}"


def parse_name(name: str) -> tuple[str, str, str]:
    """(mesh, agent_id, tool) of an MCP tool name; the agent's UUID anchors it, so a peer's name may hold dots."""
    found = _NAME.fullmatch(name)
    if found is None:
        agent_id, _, tool = name.partition(SEPARATOR)  # InvokeTool says what is wrong with it
        return "", agent_id, tool
    return found["mesh"] or "", found["agent"], found["tool"]


def _metadata(ctx: Any) -> list[tuple[str, str | bytes]]:
    request = getattr(ctx, "request", None)
    scope = getattr(request, "scope", None) or {}
    return cast(list[tuple[str, str | bytes]], scope.get(METADATA_KEY, []))


def _struct_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def _refusal(exc: grpc.aio.AioRpcError) -> MCPError:
    import mcp_types as types
    from mcp.shared.exceptions import MCPError

    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return MCPError(UNAUTHENTICATED, exc.details() or "unauthenticated")
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return MCPError(types.INVALID_PARAMS, exc.details() or "invalid arguments")
    return MCPError(types.INTERNAL_ERROR, f"{exc.code().name}: {exc.details() or ''}"[:1000])


class McpEndpoint:
    """The SDK's low-level server, stateless (each POST stands alone, so any edge replica serves any call), behind a
    small ASGI bridge from aiohttp. The caller's Authorization goes to ToolService as on every REST route: tools/list
    shows exactly what ListTools answers that credential."""

    def __init__(self, settings: EdgeSettings, backends: Backends) -> None:
        self.settings = settings
        self.backends = backends
        self.manager: StreamableHTTPSessionManager | None = None
        self._starting = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def owns(raw_path: str) -> bool:
        return raw_path == PATH

    async def start(self, app: web.Application) -> None:
        """Nothing until the first /mcp request (see the module's docstring)."""

    async def _manager(self) -> StreamableHTTPSessionManager:
        """The SDK's session manager, imported and started on first use; concurrent first requests wait for one."""
        if self.manager is not None:
            return self.manager
        async with self._starting:
            if self.manager is not None:
                return self.manager
            if self._stopping.is_set():
                raise web.HTTPServiceUnavailable(text="the edge is stopping")
            # In a worker thread: the event loop keeps serving the other routes while the SDK loads.
            await asyncio.to_thread(_import_sdk)
            from mcp.server.lowlevel import Server
            from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

            server: Server[Any] = Server(
                "agentvault-mesh", on_list_tools=self._list_tools, on_call_tool=self._call_tool
            )
            manager = StreamableHTTPSessionManager(server, stateless=True)
            # The manager's task group lives in a task of its own: the request that starts it and aiohttp's cleanup
            # hook run in different tasks, and an anyio cancel scope must be left in the task that entered it.
            started = asyncio.Event()

            async def run() -> None:
                async with manager.run():
                    started.set()
                    await self._stopping.wait()

            self._task = asyncio.create_task(run(), name="mcp-session-manager")
            await started.wait()
            self.manager = manager
            return manager

    async def stop(self, app: web.Application) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _tools(self) -> tpb_grpc.ToolServiceAsyncStub:
        return cast(Any, tpb_grpc.ToolServiceStub(self.backends.channel(self.backends.address("messaging"))))

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        import mcp_types as types

        try:
            reply = await self._tools().ListTools(
                tpb.ListToolsRequest(include_federated=True),
                metadata=_metadata(ctx),
                timeout=self.settings.call_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        tools = []
        for t in reply.tools:
            if t.mesh and not _MESH_NAME.fullmatch(t.mesh):
                continue
            schema = json.loads(t.input_schema) if t.input_schema else {"type": "object"}
            output = json.loads(t.output_schema) if t.output_schema else None
            tools.append(
                types.Tool(
                    name=mcp_name(t.agent_id, t.name, t.mesh),
                    title=t.title or None,
                    description=(t.description or t.name)
                    + (f" (agent {t.agent_name})" if t.agent_name else "")
                    + (f" (peer mesh {t.mesh})" if t.mesh else ""),
                    input_schema=schema,
                    output_schema=output,
                )
            )
        return types.ListToolsResult(tools=tools)

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        import mcp_types as types

        mesh, agent_id, tool = parse_name(params.name)
        arguments = struct_pb2.Struct()
        arguments.update(params.arguments or {})
        call = self._tools().InvokeTool(
            tpb.InvokeToolRequest(agent_id=agent_id, tool=tool, arguments=arguments, mesh=mesh), metadata=_metadata(ctx)
        )
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    p = event.progress
                    await ctx.session.report_progress(p.progress, p.total or None, p.message or None)
                elif kind == "approval_pending":
                    await ctx.session.report_progress(
                        0, None, f"waiting for approval {event.approval_pending.approval_id}"
                    )
                elif kind == "result":
                    r = event.result
                    body: dict[str, Any] = {"content": [_struct_dict(c) for c in r.content], "isError": r.is_error}
                    if r.HasField("structured_content"):
                        body["structuredContent"] = _struct_dict(r.structured_content)
                    return types.CallToolResult.model_validate(body)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise _refusal(exc) from None
            # A refusal (policy, arguments, deadline, unknown tool) is the tool call's failure, which the model
            # can read and act on: MCP's isError result, not a protocol error.
            reason = errors.from_rpc_error(exc, "agentvault.messaging.v1.ToolService").body()
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=json.dumps(reason))], is_error=True
            )
        finally:
            call.cancel()
        return types.CallToolResult(content=[types.TextContent(type="text", text="no result")], is_error=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The ASGI bridge: the aiohttp request as one ASGI HTTP request (body read whole, bounded like every
        body here), the ASGI answer streamed back as it is sent (SSE included)."""
        manager = await self._manager()
        body = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout)
        metadata = forwarded_metadata(request, body, self.settings.max_forwarded_header_bytes)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.scheme,
            "path": request.path,
            "raw_path": request.rel_url.raw_path.encode(),
            "query_string": request.rel_url.raw_query_string.encode(),
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.raw_headers],
            "client": (request.remote or "", 0),
            "server": ("edge", 0),
            "state": {},
            METADATA_KEY: metadata,
        }
        sent_body = False
        response: web.StreamResponse | None = None

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Nothing more comes: wait until the answer is done (the task is then cancelled).
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal response
            if message["type"] == "http.response.start":
                response = web.StreamResponse(status=message["status"])
                for k, v in message.get("headers", []):
                    response.headers.add(k.decode("latin-1"), v.decode("latin-1"))
                await response.prepare(request)
            elif message["type"] == "http.response.body" and response is not None:
                if message.get("body"):
                    await response.write(message["body"])
                if not message.get("more_body", False):
                    await response.write_eof()

        await manager.handle_request(scope, receive, send)
        if response is None:
            return web.Response(status=500)
        return response


def _import_sdk() -> None:
    import mcp.server.lowlevel
    import mcp.server.streamable_http_manager
    import mcp.shared.exceptions  # noqa: F401
    import mcp_types  # noqa: F401
