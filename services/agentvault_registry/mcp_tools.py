"""The MCP tool catalog's writes: which agents have an MCP endpoint, and replacing their MCP-sourced tools only."""

from __future__ import annotations

import logging
from dataclasses import replace

from agentvault.common import agents as agent_rules
from agentvault.common import pagination
from agentvault.common.errors import FailedPrecondition, invalid
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_registry.convert import spec_from_proto, to_timestamp
from agentvault_registry.store import Store

log = logging.getLogger(__name__)

# The tag that marks a tool capability as read from the agent's MCP server (and so replaced by each sync).
MCP_TAG = "mcp"
DEFAULT_PAGE = 100
MAX_PAGE = 500
_FINGERPRINT = "mcp-servers"


def is_mcp_sourced(cap: agent_rules.Capability) -> bool:
    return cap.kind == "tool" and MCP_TAG in cap.tags


def mcp_url(spec: agent_rules.AgentSpec) -> str:
    """The agent's first MCP endpoint, or ""."""
    return next((e.url for e in spec.endpoints if e.protocol == "mcp"), "")


async def list_servers(store: Store, request: pb.ListMcpServersRequest) -> pb.ListMcpServersResponse:
    size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
    if size < 0:
        raise invalid("page_size", "must not be negative")
    position = pagination.decode(request.page_token, _FINGERPRINT)
    after = str(position[0]) if position else None
    rows = await store.list_mcp_agents(after, size + 1)
    more = len(rows) > size
    rows = rows[:size]
    return pb.ListMcpServersResponse(
        servers=[
            pb.McpServer(agent_id=a.id, url=mcp_url(a.spec), update_time=to_timestamp(a.updated_at)) for a in rows
        ],
        next_page_token=pagination.encode([rows[-1].id], _FINGERPRINT) if more and rows else "",
    )


def merge_tools(current: agent_rules.AgentSpec, tools: tuple[agent_rules.Capability, ...]) -> agent_rules.AgentSpec:
    """The owner's capabilities as they are, then the MCP tools (each marked), within the registry's limits."""
    if not mcp_url(current):
        raise FailedPrecondition("the agent has no MCP endpoint", "AGENT_NOT_MCP")
    own = tuple(c for c in current.capabilities if not is_mcp_sourced(c))
    taken = {(c.kind, c.name) for c in own}
    room = agent_rules.MAX_CAPABILITIES - len(own)
    marked: list[agent_rules.Capability] = []
    for tool in tools:
        if tool.kind != "tool" or ("tool", tool.name) in taken:
            continue
        taken.add(("tool", tool.name))
        tags = tool.tags if MCP_TAG in tool.tags else (*tool.tags, MCP_TAG)
        marked.append(replace(tool, tags=tags[-agent_rules.MAX_CAPABILITY_TAGS :]))
    if len(marked) > room:
        raise invalid("tools", f"at most {room} tools fit beside the agent's own {len(own)} capabilities")
    return agent_rules.validate_spec(replace(current, capabilities=(*own, *marked)), prefix="sync")


def tools_from_proto(request: pb.SyncMcpToolsRequest) -> tuple[agent_rules.Capability, ...]:
    if len(request.tools) > agent_rules.MAX_CAPABILITIES:
        raise invalid("tools", f"at most {agent_rules.MAX_CAPABILITIES} tools")
    return spec_from_proto(pb.Agent(capabilities=request.tools), prefix="sync").capabilities
