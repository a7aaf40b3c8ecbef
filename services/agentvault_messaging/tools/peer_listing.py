"""ListTools' tools of peer meshes: federated search for the caller, filtered by this mesh's policy."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from agentvault.common.interceptors import caller_metadata
from agentvault.common.policy.engine import Outcome
from agentvault.common.policy.request import Caller, tool_target
from agentvault.discovery.v1 import discovery_service_pb2 as dpb
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb

log = logging.getLogger(__name__)

MCP_TAG = "mcp"
# Federated agents with tools read per listing (pages of discovery's merged results, local ones skipped).
MAX_PEER_AGENTS = 500
PAGE_SIZE = 200
# Discovery bounds each peer by its own FEDERATION_QUERY_TIMEOUT; this bounds the whole page.
SEARCH_SECONDS = 15.0
_FAILED = {
    dpb.PEER_QUERY_STATUS_FAILED: "failed",
    dpb.PEER_QUERY_STATUS_TIMEOUT: "did not answer in time",
    dpb.PEER_QUERY_STATUS_SKIPPED: "is reported down",
}


def peer_tools_of(agent: dpb.DiscoveredAgent) -> list[reg_pb.Capability]:
    """The tools a peer serves to other meshes: those its MCP catalog read (the peer invokes only those)."""
    return [c for c in agent.capabilities if c.kind == reg_pb.CAPABILITY_KIND_TOOL and MCP_TAG in c.tags]


async def peer_tools(
    discovery: Any, enforcer: Any, who: Caller, context: grpc.aio.ServicerContext
) -> tuple[list[tpb.Tool], list[str]]:
    """The tools of agents of peer meshes that discovery's federated search finds for the caller (asked with the
    caller's own credential, so the caller sees exactly what its search would), which this mesh's policy lets it
    invoke. Previewed, like the local listing: nothing is spent or logged per tool, each call is decided again.
    Failures leave tools out with a note; they never fail the listing."""
    if discovery is None:
        return [], ["tools of peer meshes cannot be listed: the discovery service is not configured"]
    tools: list[tpb.Tool] = []
    notes: list[str] = []
    token, seen = "", 0
    while seen < MAX_PEER_AGENTS:
        remaining = context.time_remaining()
        timeout = min(SEARCH_SECONDS, remaining) if remaining is not None else SEARCH_SECONDS
        try:
            page: dpb.SearchAgentsResponse = await discovery.SearchAgents(
                dpb.SearchAgentsRequest(
                    include_federated=True,
                    capability_kind=reg_pb.CAPABILITY_KIND_TOOL,
                    page_size=PAGE_SIZE,
                    page_token=token,
                ),
                metadata=tuple(caller_metadata(context)),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            log.info("federated tool search failed", extra={"code": exc.code().name})
            notes.append(f"tools of peer meshes are incomplete: federated search failed ({exc.code().name})")
            break
        if not token:  # every page states the same peers' outcomes
            for stat in page.federation_stats.peers:
                if stat.status in _FAILED:
                    notes.append(f"peer mesh {stat.name}: left out, its search {_FAILED[stat.status]}")
        for agent in page.agents:
            if not agent.is_federated or not agent.registry_name:
                continue  # this mesh's own agents come from the registry
            seen += 1
            tools.extend(_allowed(enforcer, who, agent))
        token = page.next_page_token
        if not token:
            break
    return tools, notes


def _allowed(enforcer: Any, who: Caller, agent: dpb.DiscoveredAgent) -> list[tpb.Tool]:
    out = []
    for cap in peer_tools_of(agent):
        # The very target InvokeTool with `mesh` decides on (federated.PeerTools): the tool's `mesh` is the peer's
        # name. The caller's trust stays as it authenticated: a preview creates no connection to a peer's agent.
        target = tool_target(agent.id, cap.name, mesh=agent.registry_name)
        if enforcer.preview(who, "tool.invoke", target).outcome is not Outcome.ALLOW:
            # "ask" is left out too: calls to tools of peer meshes cannot wait for an approval.
            continue
        out.append(
            tpb.Tool(
                agent_id=agent.id,
                name=cap.name,
                title=cap.title,
                description=cap.description,
                input_schema=cap.input_schema,
                output_schema=cap.output_schema,
                agent_name=agent.name,
                mesh=agent.registry_name,
            )
        )
    return out
