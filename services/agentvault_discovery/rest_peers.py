"""REST peers: a signed GET of /api/v1/agents, read up to a byte limit, its JSON turned into agents to validate."""

from __future__ import annotations

import json
from urllib.parse import urlencode, urlsplit

import aiohttp
from yarl import URL

from agentvault.common import signing, tracing
from agentvault.common.peers import PeerTarget
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_discovery import domain
from agentvault_discovery.outcomes import REASON_INVALID, REASON_REJECTED, REASON_UNAVAILABLE, PeerError
from agentvault_discovery.settings import DiscoverySettings

REST_AGENTS_PATH = "/api/v1/agents"


class RestPeers:
    """Searches REST peers over the process's one HTTP client session."""

    def __init__(self, settings: DiscoverySettings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session

    async def search(self, peer: PeerTarget, query: domain.PeerQuery) -> bytes:
        params = [
            ("search", query.search),
            ("agent_type", query.agent_type),
            ("tag", query.tag),
            ("capability_kind", domain.KIND_WORDS.word(query.capability_kind)),
            ("capability_name", query.capability_name),
            ("capability_version", query.capability_version),
            ("limit", str(query.limit)),
        ]
        base = urlsplit(peer.registry_url)
        # The signature covers the path and query exactly as sent, so the URL is encoded once, here, and
        # handed to aiohttp as already encoded.
        path_and_query = f"{base.path.rstrip('/')}{REST_AGENTS_PATH}?{urlencode([(k, v) for k, v in params if v])}"
        url = URL(f"{base.scheme}://{base.netloc}{path_and_query}", encoded=True)
        headers = {"Accept": "application/json", signing.REGISTRY_HEADER: self._settings.registry_name}
        if peer.api_key:
            nonce = signing.new_nonce()
            headers |= {
                "Authorization": f"Bearer {peer.api_key}",
                signing.NONCE_HEADER: nonce,
                signing.SIGNATURE_HEADER: signing.sign("GET", path_and_query, "", peer.api_key, nonce=nonce),
            }
        limit = self._settings.max_peer_response_bytes
        try:
            # A CLIENT span per peer call (when spans are recorded), whose context the peer's edge continues.
            with tracing.span("GET " + REST_AGENTS_PATH, tracing.CLIENT, attributes={"peer.name": peer.name}):
                body = await self._get(url, headers | tracing.inject({}), limit)
        except aiohttp.ClientError as exc:
            raise PeerError(REASON_UNAVAILABLE, f"peer call failed: {exc.__class__.__name__}: {exc}") from None
        return body

    async def _get(self, url: URL, headers: dict[str, str], limit: int) -> bytes:
        async with self._session.get(url, headers=headers, allow_redirects=False) as response:
            if response.status in (401, 403):
                raise PeerError(REASON_REJECTED, f"authentication rejected by peer (HTTP {response.status})")
            if response.status != 200:
                raise PeerError(REASON_UNAVAILABLE, f"peer answered HTTP {response.status}")
            if response.content_length is not None and response.content_length > limit:
                raise PeerError(
                    REASON_INVALID, f"peer answer too large ({response.content_length} bytes, limit {limit})"
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise PeerError(REASON_INVALID, f"peer answer too large (over {limit} bytes)")
        return bytes(body)

    def parse(self, body: bytes) -> tuple[list[pb.Agent], int]:
        """A REST peer's JSON answer as agents, each still to be validated (a REST peer has no generation)."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise PeerError(REASON_INVALID, "peer answered with invalid JSON") from None
        raw_agents = document.get("agents") if isinstance(document, dict) else None
        if not isinstance(raw_agents, list):
            raise PeerError(REASON_INVALID, 'peer answer has no "agents" list')
        agents = []
        for raw in raw_agents[: self._settings.max_results_per_peer * 2]:
            agent = domain.agent_from_json(raw)
            # An entry that is not even an object becomes an empty agent, which validation then rejects.
            agents.append(agent if agent is not None else pb.Agent())
        return agents, 0
