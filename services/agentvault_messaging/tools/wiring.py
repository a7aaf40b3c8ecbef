"""The tools part of the messaging process: the MCP catalog worker (and ToolService), from the environment."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc

from agentvault.common.lease import Leases
from agentvault.common.server import background
from agentvault.common.settings import Env
from agentvault.discovery.v1 import discovery_service_pb2_grpc
from agentvault.messaging.v1 import tool_service_pb2_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc
from agentvault_messaging.tools.catalog import LEASE_TABLE, Catalog
from agentvault_messaging.tools.federated import PeerTools, PeerToolServer
from agentvault_messaging.tools.service import ToolServicer


def start_catalog(
    stack: contextlib.AsyncExitStack, registry: Any, agents: Any, *, block_private: bool, pool: Any = None
) -> Catalog:
    """`registry`: a RegistryService stub whose channel carries svc-messaging's token (tools:sync); `pool`: the
    service's PostgreSQL pool, for the leases that keep each MCP server to one replica's catalog."""
    env = Env()
    catalog = Catalog(
        registry,
        agents,
        block_private=block_private,
        scan_seconds=env.float("TOOLS_CATALOG_SCAN_SECONDS", 60.0, minimum=0.1),
        refresh_seconds=env.float("TOOLS_CATALOG_REFRESH_SECONDS", 300.0, minimum=0.1),
        leases=Leases(pool, LEASE_TABLE) if pool is not None else None,
        # Longer than a listing and its sync take (10 s at most each): the holder renews every third of it.
        lease_seconds=env.float("TOOLS_CATALOG_LEASE_SECONDS", 30.0, minimum=1.0),
    )
    background(stack, catalog.run(), "mcp-catalog")
    return catalog


def serve_tools(
    server: Any,
    *,
    callers: Any,
    registry: Any,
    own_channel: Any,
    agents: Any,
    enforcer: Any,
    control: Any,
    mesh: str,
    block_private: bool,
    peer_facing: Any = None,
    book: Any = None,
    peer_client: Any = None,
) -> ToolServicer:
    """ToolService on the messaging server. `registry` forwards callers' credentials; `own_channel` carries
    svc-messaging's token (GetApproval, and the registry reads of the peer-facing side). With `book` (the peers,
    when federation is configured) tools of peer meshes can be invoked, and `peer_facing` serves ours to them."""
    servicer = ToolServicer(
        callers,
        registry,
        agents,
        enforcer,
        control,
        policy_service_pb2_grpc.PolicyServiceStub(own_channel),
        mesh=mesh,
        block_private=block_private,
        max_seconds=Env().float("TOOLS_MAX_CALL_SECONDS", 300.0, minimum=1.0),
    )
    if book is not None and peer_client is not None:
        servicer.peers = PeerTools(book, peer_client)
    # ListTools' include_federated asks discovery's federated search, with the caller's own credential.
    servicer.discovery = discovery_service_pb2_grpc.DiscoveryServiceStub(
        grpc.aio.insecure_channel(Env().addr("DISCOVERY_ADDR", "DISCOVERY_PORT"))
    )
    if peer_facing is not None:
        peer_facing.tools = PeerToolServer(servicer, registry_service_pb2_grpc.RegistryServiceStub(own_channel))
    server.serve(tool_service_pb2_grpc.add_ToolServiceServicer_to_server, servicer)
    return servicer
