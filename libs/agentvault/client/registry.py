"""RegistryClient: a typed asyncio client for agentvault.registry.v1.RegistryService.

Idempotent reads are retried on UNAVAILABLE by gRPC itself, from the retry policy in the channel's service
config (gRFC A6: exponential backoff with full jitter, at most 5 attempts, all within the call's deadline).
Writes are never retried: a CreateAgent whose reply was lost could otherwise register the agent twice.
"""

# `timeout` is a gRPC deadline, sent to the server and covering retries, which asyncio.timeout is not.

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypedDict, TypeVar, Unpack

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from agentvault.client.convert import enum_number
from agentvault.client.errors import from_rpc_error
from agentvault.common.interceptors import REQUEST_ID_KEY, outgoing_metadata
from agentvault.common.settings import Env
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
# Safe to repeat: reading twice has the same effect as reading once.
IDEMPOTENT_METHODS = ("GetAgent", "ListAgents", "GetHealth", "ListApiKeys")
TOKEN_ENV = "AGENTVAULT_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_TIMEOUT = 10.0

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retry policy for the idempotent methods. gRPC caps max_attempts at 5 and waits a random time in
    [0, min(initial_backoff * multiplier**(n-1), max_backoff)] before attempt n+1."""

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 4.0
    multiplier: float = 2.0

    def service_config(self) -> str:
        return json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS],
                        "retryPolicy": {
                            "maxAttempts": self.max_attempts,
                            "initialBackoff": f"{self.initial_backoff:.3f}s",
                            "maxBackoff": f"{self.max_backoff:.3f}s",
                            "backoffMultiplier": self.multiplier,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ]
            }
        )


class AgentFilters(TypedDict, total=False):
    """ListAgents filters; enums may be words ("skill", "federated")."""

    agent_type: str
    tag: str
    capability_kind: str | int
    capability_name: str
    capability_version: str
    owner: str
    sharing: str | int


def _list_request(search: str, page_size: int, page_token: str, filters: AgentFilters) -> pb.ListAgentsRequest:
    return pb.ListAgentsRequest(
        page_size=page_size,
        page_token=page_token,
        search=search,
        agent_type=filters.get("agent_type", ""),
        tag=filters.get("tag", ""),
        capability_kind=enum_number(  # type: ignore[arg-type]
            pb.CapabilityKind.DESCRIPTOR, filters.get("capability_kind", ""), "capability_kind"
        ),
        capability_name=filters.get("capability_name", ""),
        capability_version=filters.get("capability_version", ""),
        owner=filters.get("owner", ""),
        sharing=enum_number(pb.Sharing.DESCRIPTOR, filters.get("sharing", ""), "sharing"),  # type: ignore[arg-type]
    )


class RegistryClient:
    """Calls one registry. Use as `async with RegistryClient() as client:` or call `close()` when done.

    address: HOST:PORT; default REGISTRY_ADDR, else 127.0.0.1:$REGISTRY_PORT.
    token: bearer credential; default AGENTVAULT_TOKEN; "" sends none.
    timeout: default deadline of each call in seconds, retries included; every method can override it.
    root_certificates: PEM roots; with them (or tls=True, which uses the system roots) the channel uses TLS.
    retry: policy for idempotent calls; None disables retries.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        root_certificates: bytes | None = None,
        tls: bool = False,
        retry: RetryPolicy | None = RetryPolicy(),  # frozen, so sharing the default is safe
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        env = Env()
        self.address = address or env.addr("REGISTRY_ADDR", "REGISTRY_PORT")
        self.timeout = timeout
        self._token = os.environ.get(TOKEN_ENV, "") if token is None else token
        channel_options: list[tuple[str, Any]] = [
            # Reconnect soon after a restart instead of backing off towards gRPC's default 120 s, so that
            # retry attempts find the server again within a call's deadline.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if retry is not None:
            channel_options += [("grpc.enable_retries", 1), ("grpc.service_config", retry.service_config())]
        else:
            channel_options.append(("grpc.enable_retries", 0))
        channel_options += list(options)
        self._options = channel_options
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates) if root_certificates is not None or tls else None
        )
        self._channel: grpc.aio.Channel | None = None
        self._registry: pb_grpc.RegistryServiceAsyncStub | None = None

    @property
    def _stub(self) -> pb_grpc.RegistryServiceAsyncStub:
        # Opened on first use: a grpc.aio channel belongs to the event loop that is running when it is created,
        # so the client may be constructed anywhere, even before asyncio.run.
        if self._registry is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._registry = pb_grpc.RegistryServiceStub(self._channel)
        return self._registry

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; a later call opens a new one."""
        channel, self._channel, self._registry = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        extra = [("authorization", f"Bearer {self._token}")] if self._token else []
        # Inside a service the current request id and trace context travel on; otherwise each call gets its own id.
        md = outgoing_metadata(extra)
        if not any(k == REQUEST_ID_KEY for k, _ in md):
            md.append((REQUEST_ID_KEY, uuid.uuid4().hex))
        return md

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> Resp:
        md = self._metadata()
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=md)
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc, dict(md)[REQUEST_ID_KEY])
        # A read against a server that is down waits out its retries; when that outlasts the deadline the
        # status says only "Deadline Exceeded", so say why.
        if (
            err.code == grpc.StatusCode.DEADLINE_EXCEEDED
            and self._channel is not None
            and self._channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        ):
            err.message = f"{err.message} while retrying: the server at {self.address} is unreachable"
        raise err

    # ------------------------------------------------------------------------------------------- agents

    async def create_agent(self, agent: pb.Agent, *, timeout: float | None = None) -> pb.Agent:
        """Registers `agent` (build one with `build_agent`) owned by the caller; never retried."""
        return await self._call(self._stub.CreateAgent, pb.CreateAgentRequest(agent=agent), timeout)

    async def get_agent(self, id: str, *, timeout: float | None = None) -> pb.Agent:
        return await self._call(self._stub.GetAgent, pb.GetAgentRequest(id=id), timeout)

    async def list_agents(
        self,
        *,
        search: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        **filters: Unpack[AgentFilters],
    ) -> pb.ListAgentsResponse:
        """One page; page_size 0 means the server's default (50), larger than 500 is coerced to 500."""
        request = _list_request(search, page_size, page_token, filters)
        return await self._call(self._stub.ListAgents, request, timeout)

    async def search_agents(
        self,
        query: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        **filters: Unpack[AgentFilters],
    ) -> pb.ListAgentsResponse:
        """One page of a full-text search, ranked by relevance."""
        return await self.list_agents(
            search=query, page_size=page_size, page_token=page_token, timeout=timeout, **filters
        )

    async def iter_agents(
        self,
        *,
        search: str = "",
        page_size: int = 0,
        timeout: float | None = None,
        **filters: Unpack[AgentFilters],
    ) -> AsyncIterator[pb.Agent]:
        """Every matching agent, fetching the next page as the previous one is consumed; `timeout` is per page."""
        token = ""
        while True:
            page = await self.list_agents(
                search=search, page_size=page_size, page_token=token, timeout=timeout, **filters
            )
            for agent in page.agents:
                yield agent
            token = page.next_page_token
            if not token:
                return

    async def update_agent(
        self, agent: pb.Agent, update_mask: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> pb.Agent:
        """Changes the fields of `agent` (its id set) named in `update_mask`; None or [] replaces every writable
        field (PUT semantics), so pass a mask unless `agent` is complete."""
        mask = field_mask_pb2.FieldMask(paths=list(update_mask or ()))
        return await self._call(self._stub.UpdateAgent, pb.UpdateAgentRequest(agent=agent, update_mask=mask), timeout)

    async def delete_agent(self, id: str, *, timeout: float | None = None) -> None:
        await self._call(self._stub.DeleteAgent, pb.DeleteAgentRequest(id=id), timeout)

    async def health(self, *, timeout: float | None = None) -> pb.GetHealthResponse:
        return await self._call(self._stub.GetHealth, pb.GetHealthRequest(), timeout)

    async def caller(self, *, timeout: float | None = None) -> pb.Caller:
        """The principal behind this client's credential (empty without one)."""
        return await self._call(self._stub.GetCaller, pb.GetCallerRequest(), timeout)

    # ----------------------------------------------------------------------------------------- api keys

    async def create_api_key(
        self, name: str, role: str | int = "member", *, principal_id: str = "", timeout: float | None = None
    ) -> pb.CreateApiKeyResponse:
        """Issues a key (admin only); the response's `token` is shown this once and cannot be fetched again.

        The key acts as a new principal, or as `principal_id` (another key for the same owner)."""
        request = pb.CreateApiKeyRequest(
            name=name,
            role=enum_number(pb.Role.DESCRIPTOR, role, "role"),  # type: ignore[arg-type]
            principal_id=principal_id,
        )
        return await self._call(self._stub.CreateApiKey, request, timeout)

    async def list_api_keys(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> pb.ListApiKeysResponse:
        request = pb.ListApiKeysRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListApiKeys, request, timeout)

    async def iter_api_keys(self, *, page_size: int = 0, timeout: float | None = None) -> AsyncIterator[pb.ApiKey]:
        token = ""
        while True:
            page = await self.list_api_keys(page_size=page_size, page_token=token, timeout=timeout)
            for key in page.api_keys:
                yield key
            token = page.next_page_token
            if not token:
                return

    async def revoke_api_key(self, id: str, *, timeout: float | None = None) -> pb.ApiKey:
        return await self._call(self._stub.RevokeApiKey, pb.RevokeApiKeyRequest(id=id), timeout)
