"""The probes: gRPC health + federation info for mesh peers, GET /api/v1/health for REST peers, GET for agents.

Every probe returns a CheckResult and never raises: a peer's failure is data, not an exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvault.common import agent_auth, egress, peers
from agentvault.common import agents as agent_rules
from agentvault.common.enums import enum_words
from agentvault.common.errors import Unavailable
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault_healthmonitor.domain import (
    ERROR,
    HEALTHY,
    TIMEOUT,
    UNHEALTHY,
    UNREACHABLE,
    AgentSubject,
    CheckResult,
    PeerSubject,
)

log = logging.getLogger(__name__)

REST_HEALTH_PATH = "/api/v1/health"
# What that path answers: registry.v1.HealthResponse, whose status is a registry.v1.HealthStatus.
HEALTH_STATUS = enum_words(reg_pb.HealthStatus.DESCRIPTOR)
# The gRPC health service name a mesh peer must report SERVING: the API this mesh calls on it.
FEDERATION_SERVICE = fed_pb.DESCRIPTOR.services_by_name["FederationService"].full_name
MAX_BODY = 64 * 1024
INT32_MAX = 2**31 - 1
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A private subchannel per check: gRPC otherwise shares subchannels between channels with the same target,
    # and a shared one still in reconnect backoff would report a recovered peer as unreachable.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", MAX_BODY),
]


@dataclass(frozen=True)
class _Route:
    protocol: int
    grpc_endpoint: str
    mtls: bool
    expires: float


class Prober:
    """Runs single checks; holds the shared HTTP session and the cache of peers' discovered protocols."""

    def __init__(
        self,
        timeout: float,
        discovery_ttl: float,
        tls: grpc.ChannelCredentials | None,
        max_connections: int,
        block_private_agent_urls: bool = False,
        agent_tls: peers.TlsFiles | None = None,
        resolve_auth: Callable[[str], Awaitable[tuple[agent_rules.AgentAuth, str]]] | None = None,
    ) -> None:
        self.timeout = timeout
        self.discovery_ttl = discovery_ttl
        self.tls = tls
        # force_close: each check opens its own connection, so "accepts connections" is what is tested.
        connector = aiohttp.TCPConnector(limit=max_connections, force_close=True, ttl_dns_cache=10)
        self.session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": "agentvault-health/1"})
        # Agents' URLs are set by any member: their checks go through a session that refuses metadata and
        # other sensitive addresses, however the name resolves.
        self.block_private_agent_urls = block_private_agent_urls
        self.agent_session = egress.guarded_session(
            block_private_agent_urls,
            connector_args={"limit": max_connections, "force_close": True, "ttl_dns_cache": 10},
            headers={"User-Agent": "agentvault-health/1"},
        )
        self._routes: dict[tuple[str, str], _Route] = {}
        # How to authenticate to agents whose registration asks for it: resolved from the registry once per
        # version of the agent, the mesh's client certificate (FEDERATION_TLS_*) for those that want mTLS.
        self.connector = agent_auth.AgentConnector(
            self.agent_session, agent_tls, block_private=block_private_agent_urls
        )
        self.resolve_auth = resolve_auth

    async def close(self) -> None:
        await self.session.close()
        await self.agent_session.close()

    def forget(self, peer_ids: set[str]) -> None:
        """Drops cached routes of peers that are gone."""
        for key in [k for k in self._routes if k[0] not in peer_ids]:
            del self._routes[key]

    # ------------------------------------------------------------------------------------------ peers

    async def check_peer(self, peer: PeerSubject) -> CheckResult:
        started = time.perf_counter()
        deadline = started + self.timeout
        try:
            async with asyncio.timeout(self.timeout):
                route = await self._route(peer, deadline)
                if route.protocol == fed_pb.PEER_PROTOCOL_GRPC:
                    status, error, count = await self._grpc(route, deadline)
                else:
                    status, error, count = await self._rest(peer.registry_url, deadline)
        except TimeoutError:
            status, error, count = TIMEOUT, f"no answer within {self.timeout:g}s", None
        except aiohttp.ClientConnectorDNSError as exc:
            status, error, count = UNREACHABLE, f"DNS: {exc.os_error}", None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            status, error, count = ERROR, f"TLS: {exc}", None
        except aiohttp.ClientConnectorError as exc:
            status, error, count = UNREACHABLE, f"cannot connect: {exc.os_error.strerror or exc.os_error}", None
        except aiohttp.ClientResponseError as exc:
            status, error, count = UNHEALTHY, f"HTTP {exc.status}", None
        except aiohttp.ClientError as exc:
            status, error, count = ERROR, f"{type(exc).__name__}: {exc}", None
        except Exception as exc:  # a probe must never take the loop down; the failure is recorded instead
            log.exception("peer check of %s failed unexpectedly", peer.name)
            status, error, count = ERROR, f"{type(exc).__name__}: {exc}", None
        learned: tuple[int, str] = (0, "")
        if status != HEALTHY:
            # A failing peer is rediscovered next time: it may have moved, or answered discovery while half up.
            self._routes.pop((peer.id, peer.registry_url), None)
        elif (found := self._routes.get((peer.id, peer.registry_url))) is not None:
            # Only a route from the discovery document is cached here; configured ones never are.
            learned = (found.protocol, found.grpc_endpoint if found.protocol == fed_pb.PEER_PROTOCOL_GRPC else "")
        elapsed = (time.perf_counter() - started) * 1000
        return CheckResult(status, round(elapsed, 3), error, count, *learned)

    async def _route(self, peer: PeerSubject, deadline: float) -> _Route:
        if peer.protocol == fed_pb.PEER_PROTOCOL_GRPC and peer.grpc_endpoint:
            return _Route(peer.protocol, peer.grpc_endpoint, peer.require_mtls, 0)
        if peer.protocol == fed_pb.PEER_PROTOCOL_REST:
            return _Route(peer.protocol, "", peer.require_mtls, 0)
        key = (peer.id, peer.registry_url)
        cached = self._routes.get(key)
        now = time.monotonic()
        if cached is not None and cached.expires > now:
            return cached
        found = await peers.discover(self.session, peer.registry_url, max(deadline - time.perf_counter(), 0.001))
        mtls = peer.require_mtls or found.mtls_required
        route = _Route(found.protocol, found.grpc_endpoint, mtls, now + self.discovery_ttl)
        self._routes[key] = route
        return route

    async def _grpc(self, route: _Route, deadline: float) -> tuple[str, str, int | None]:
        if route.mtls:
            if self.tls is None:
                return ERROR, "peer requires mutual TLS but FEDERATION_TLS_CA/CERT/KEY are not set", None
            channel = grpc.aio.secure_channel(route.grpc_endpoint, self.tls, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(route.grpc_endpoint, options=CHANNEL_OPTIONS)
        try:
            remaining = max(deadline - time.perf_counter(), 0.001)
            health: Awaitable[health_pb2.HealthCheckResponse] = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=FEDERATION_SERVICE), timeout=remaining
            )
            info: Awaitable[fed_pb.FederationInfo] = fed_grpc.FederationServiceStub(channel).GetFederationInfo(
                fed_pb.GetFederationInfoRequest(), timeout=remaining
            )
            results: list[Any] = list(await asyncio.gather(health, info, return_exceptions=True))
        finally:
            await channel.close()
        answer, details = results
        if isinstance(answer, grpc.aio.AioRpcError):
            return _rpc_failure(answer)
        if isinstance(answer, BaseException):
            return ERROR, f"{type(answer).__name__}: {answer}", None
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return UNHEALTHY, health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status), None
        count = None
        if isinstance(details, fed_pb.FederationInfo):
            count = min(max(int(details.agent_count), 0), INT32_MAX)
        return HEALTHY, "", count

    async def _rest(self, registry_url: str, deadline: float) -> tuple[str, str, int | None]:
        remaining = max(deadline - time.perf_counter(), 0.001)
        async with self.session.get(
            registry_url + REST_HEALTH_PATH,
            timeout=aiohttp.ClientTimeout(total=remaining),
            allow_redirects=False,
        ) as response:
            if response.status != 200:
                return UNHEALTHY, f"HTTP {response.status}", None
            raw = await response.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return ERROR, f"health answer larger than {MAX_BODY} bytes", None
        return _rest_answer(raw)

    # ------------------------------------------------------------------------------------------ agents

    async def check_agent(self, agent: AgentSubject) -> CheckResult:
        started = time.perf_counter()
        try:
            if not agent.url.startswith(("http://", "https://")):
                status, error = ERROR, "health_check_url must be http or https"
            else:
                egress.check_url(agent.url, self.block_private_agent_urls)
                async with asyncio.timeout(self.timeout):
                    auth = await self._agent_auth(agent)
                    # No redirects (call's default): an agent's URL is user input, and following it elsewhere
                    # widens what we fetch and where its credentials go.
                    answer = await agent_auth.call(
                        self.agent_session,
                        "GET",
                        agent.url,
                        auth,
                        max_body=0,
                        timeout=aiohttp.ClientTimeout(total=self.timeout),
                    )
                ok = 200 <= answer.status < 300
                status, error = (HEALTHY, "") if ok else (UNHEALTHY, f"HTTP {answer.status}")
        except Unavailable as exc:  # no token, no key ring, no client certificate
            status, error = ERROR, f"auth: {exc.message}"
        except grpc.aio.AioRpcError as exc:
            status, error = ERROR, f"auth: cannot resolve the agent's credentials: {exc.code().name}"
        except TimeoutError:
            status, error = TIMEOUT, f"no answer within {self.timeout:g}s"
        except egress.EgressRefused as exc:
            status, error = ERROR, f"refused: {exc}"
        except aiohttp.ClientConnectorDNSError as exc:
            status, error = UNREACHABLE, f"DNS: {exc.os_error}"
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            status, error = ERROR, f"TLS: {exc}"
        except aiohttp.ClientConnectorError as exc:
            status, error = UNREACHABLE, f"cannot connect: {exc.os_error.strerror or exc.os_error}"
        except (aiohttp.ClientError, ValueError) as exc:
            status, error = ERROR, f"{type(exc).__name__}: {exc}"
        elapsed = (time.perf_counter() - started) * 1000
        return CheckResult(status, round(elapsed, 3), error)

    async def _agent_auth(self, agent: AgentSubject) -> agent_auth.PreparedAuth:
        if agent.auth_kind in (reg_pb.AGENT_AUTH_KIND_UNSPECIFIED, reg_pb.AGENT_AUTH_KIND_NONE):
            self.connector.forget(agent.id)
            return agent_auth.NO_AUTH
        if self.resolve_auth is None:
            raise agent_auth.AgentAuthUnavailable("this prober cannot resolve agents' credentials")
        resolve = self.resolve_auth
        return await self.connector.for_agent(agent.id, agent.version, lambda: resolve(agent.id))


def _rpc_failure(exc: grpc.aio.AioRpcError) -> tuple[str, str, int | None]:
    code = exc.code()
    detail = (exc.details() or "")[:200]
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TIMEOUT, "no answer before the deadline", None
    if code == grpc.StatusCode.UNAVAILABLE:
        return UNREACHABLE, detail or "unavailable", None
    if code == grpc.StatusCode.NOT_FOUND:
        # The server answers health checks but does not serve the federation API.
        return UNHEALTHY, f"{FEDERATION_SERVICE} is not served", None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ERROR, "the endpoint does not implement grpc.health.v1", None
    return ERROR, f"{code.name}: {detail}", None


def _rest_answer(raw: bytes) -> tuple[str, str, int | None]:
    """Parses {"status": "healthy", "agent_count": N}; this mesh's own edge answers with proto JSON words."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ERROR, "health answer is not JSON", None
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
        return ERROR, "health answer has no status", None
    # The shared word mapping: "healthy", "HEALTH_STATUS_HEALTHY" and the number all name the same value.
    if HEALTH_STATUS.number(doc["status"]) != reg_pb.HEALTH_STATUS_HEALTHY:
        return UNHEALTHY, f"peer reports status {doc['status'][:40]!r}", None
    count = doc.get("agent_count")
    # int64 fields arrive as strings in proto JSON; anything else is ignored rather than failing the check.
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    agent_count = (
        min(count, INT32_MAX) if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
    )
    return HEALTHY, "", agent_count
