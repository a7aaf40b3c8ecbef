"""The MCP tool catalog: each registered MCP server's tools/list kept as the agent's `tool` capabilities.

Every messaging replica runs a catalog; a lease per MCP server (agentvault.common.lease, table tool_catalog_leases,
made by migration 0007) makes one replica at a time watch and sync a given server: one session per server for the
mesh, not one per replica, and one writer of its listing. The holder renews the lease while it watches and releases
it when it stops watching; a replica that dies leaves it to expire (TOOLS_CATALOG_LEASE_SECONDS), then another takes
the server over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import mcp_types as types

from agentvault.common import agents as rules
from agentvault.common.agent_auth import PreparedAuth
from agentvault.common.lease import Leases
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault_messaging.tools.mcp_client import is_tools_changed, open_session

log = logging.getLogger(__name__)

# An MCP server lists at most this many pages and tools; the rest is ignored (and logged).
MAX_PAGES = 10
MAX_TOOLS = rules.MAX_CAPABILITIES
_PROBE = rules.AgentSpec(did="did:web:probe", name="probe", version="1.0.0")
LEASE_TABLE = "tool_catalog_leases"
LEASE_KIND = "mcp"


class LeaseLost(Exception):
    """Another replica holds this server's lease now (ours expired and was reclaimed): stop watching it."""


def replica_name() -> str:
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Server:
    agent_id: str
    url: str


def capability(tool: types.Tool) -> reg_pb.Capability | None:
    """The tool as a capability of kind tool, or None when the registry's capability rules refuse it (a name it
    cannot hold, a schema too large, deep or invalid): one bad tool does not hide the server's others."""
    cap = rules.Capability(
        kind="tool",
        name=tool.name,
        description=(tool.description or "")[: rules.MAX_CAPABILITY_DESCRIPTION],
        input_schema=json.dumps(tool.input_schema, separators=(",", ":")) if tool.input_schema else "",
        output_schema=json.dumps(tool.output_schema, separators=(",", ":")) if tool.output_schema else "",
        title=(tool.title or "")[: rules.MAX_NAME],
        tags=("mcp",),
    )
    try:
        rules.validate_spec(rules.AgentSpec(**{**_PROBE.__dict__, "capabilities": (cap,)}))
    except Exception as exc:  # the rules' InvalidArgument: this tool is left out
        log.info("MCP tool left out of the catalog", extra={"tool": tool.name[:128], "why": str(exc)[:300]})
        return None
    return reg_pb.Capability(
        kind=reg_pb.CAPABILITY_KIND_TOOL,
        name=cap.name,
        description=cap.description,
        input_schema=cap.input_schema,
        output_schema=cap.output_schema,
        title=cap.title,
        tags=list(cap.tags),
    )


async def list_tools(session: Any) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor or len(tools) >= MAX_TOOLS:
            break
    return tools[:MAX_TOOLS]


class Catalog:
    """Watches every agent with an MCP endpoint: one session each, re-listing on notifications/tools/list_changed
    and every `refresh_seconds`; the agents are re-read from the registry every `scan_seconds`."""

    def __init__(
        self,
        registry: Any,  # RegistryService stub on the channel carrying svc-messaging's token
        credentials: Any,  # AgentDirectory: (agent_id) -> PreparedAuth
        *,
        block_private: bool,
        scan_seconds: float,
        refresh_seconds: float,
        call_seconds: float = 10.0,
        leases: Leases | None = None,
        lease_seconds: float = 30.0,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self.block_private = block_private
        self.scan_seconds = scan_seconds
        self.refresh_seconds = refresh_seconds
        self.call_seconds = call_seconds
        # None: this replica watches every server itself (a single replica, or tests of the catalog alone).
        self.leases = leases
        self.lease_seconds = lease_seconds
        self.owner = replica_name()
        self._watchers: dict[str, tuple[Server, asyncio.Task[None]]] = {}
        self.servers: dict[str, Server] = {}
        # What was last written per agent: an unchanged listing (every refresh, mostly) writes nothing.
        self._synced: dict[str, list[bytes]] = {}

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.scan()
                except grpc.aio.AioRpcError as exc:
                    log.warning("cannot list the MCP servers: %s", exc.code().name)
                await asyncio.sleep(self.scan_seconds)
        finally:
            for _, task in self._watchers.values():
                task.cancel()
            for _, task in list(self._watchers.values()):
                with contextlib.suppress(BaseException):
                    await task

    async def scan(self) -> None:
        found: dict[str, Server] = {}
        token = ""
        while True:
            page = await self.registry.ListMcpServers(
                reg_pb.ListMcpServersRequest(page_size=500, page_token=token), timeout=self.call_seconds
            )
            for s in page.servers:
                # Not its update time: each sync changes that. Credentials are re-read on each (re)connection.
                found[s.agent_id] = Server(s.agent_id, s.url)
            token = page.next_page_token
            if not token:
                break
        self.servers = found
        # Each scan writes every listing once more: an owner's PUT that dropped the MCP tools is repaired.
        self._synced.clear()
        for agent_id, (server, task) in list(self._watchers.items()):
            if found.get(agent_id) != server or task.done():
                task.cancel()
                del self._watchers[agent_id]
                self._synced.pop(agent_id, None)
        for agent_id, server in found.items():
            if agent_id not in self._watchers:
                task = asyncio.create_task(self.watch(server), name=f"mcp-catalog-{agent_id}")
                self._watchers[agent_id] = (server, task)

    async def watch(self, server: Server) -> None:
        """Keeps one agent's tools fresh until cancelled (its registration changed or went away), while this
        replica holds the server's lease."""
        try:
            await self._watch(server)
        finally:
            if self.leases is not None:
                with contextlib.suppress(Exception):
                    await self.leases.release(LEASE_KIND, server.agent_id, self.owner)

    async def _hold(self, server: Server) -> bool:
        """Whether this replica holds the server's lease for the next lease period (renewed, or claimed now)."""
        if self.leases is None:
            return True
        if await self.leases.renew(LEASE_KIND, server.agent_id, self.owner, self.lease_seconds):
            return True
        return await self.leases.claim_one(LEASE_KIND, server.agent_id, self.owner, self.lease_seconds)

    async def _watch(self, server: Server) -> None:
        failures = 0
        changed = asyncio.Event()
        renew_every = self.lease_seconds / 3
        loop = asyncio.get_running_loop()

        async def notified(message: Any) -> None:
            if is_tools_changed(message):
                changed.set()

        while True:
            try:
                if not await self._hold(server):
                    await asyncio.sleep(renew_every)  # another replica watches it; take over if it stops
                    continue
                prepared: PreparedAuth = await self.credentials.auth(server.agent_id)
                async with open_session(
                    server.url, prepared, block_private=self.block_private, on_notification=notified
                ) as session:
                    while True:
                        changed.clear()
                        async with asyncio.timeout(self.call_seconds):
                            tools = await list_tools(session)
                        await self.sync(server, tools)
                        failures = 0
                        refresh_at = loop.time() + self.refresh_seconds
                        while not changed.is_set() and (left := refresh_at - loop.time()) > 0:
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(changed.wait(), min(left, renew_every))
                            if not await self._hold(server):
                                raise LeaseLost
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                log.info(
                    "MCP server's catalog lease taken over by another replica", extra={"agent_id": server.agent_id}
                )
                continue
            except Exception as exc:  # any failure of the server, the network or the database: try again later
                failures += 1
                log.info(
                    "MCP server unavailable for the catalog",
                    extra={"agent_id": server.agent_id, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
            await asyncio.sleep(min(self.refresh_seconds, 0.5 * 2 ** min(failures, 8)))

    async def sync(self, server: Server, tools: list[types.Tool]) -> None:
        caps = [c for c in (capability(t) for t in tools) if c is not None]
        written = [c.SerializeToString(deterministic=True) for c in caps]
        if self._synced.get(server.agent_id) == written:
            return
        await self.registry.SyncMcpTools(
            reg_pb.SyncMcpToolsRequest(agent_id=server.agent_id, tools=caps), timeout=self.call_seconds
        )
        self._synced[server.agent_id] = written
        log.info("MCP tools synced", extra={"agent_id": server.agent_id, "tools": len(caps)})
