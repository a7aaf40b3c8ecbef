"""A2A agent cards (1.0, and 0.3) read into agent specs: fetched under the egress rules, every field bounded."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from agentvault.common import agents as agent_rules
from agentvault.common import capability_schemas, egress, versions
from agentvault.common.errors import invalid
from agentvault.common.settings import Env

MAX_CARD_BYTES = capability_schemas.MAX_CARD_BYTES
FETCH_TIMEOUT = 5.0
MAX_REDIRECTS = 3
WELL_KNOWN = ("/.well-known/agent-card.json", "/.well-known/agent.json")  # A2A 1.0, then 0.3
# A2A protocol bindings (1.0 protocolBinding, 0.3 transport) and the endpoint protocol each becomes.
BINDINGS = {"JSONRPC": "a2a", "HTTP+JSON": "a2a", "GRPC": "grpc"}
_VERSION_SHORT = re.compile(r"^(0|[1-9][0-9]{0,8})(?:\.(0|[1-9][0-9]{0,8}))?$")
_SLUG = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True)
class CardImporter:
    """How cards are fetched. Link-local (metadata) addresses are always refused; private and loopback ones too
    when block_private (AGENT_CARD_BLOCK_PRIVATE_URLS), as for the health monitor's agent URLs."""

    block_private: bool = False
    timeout: float = FETCH_TIMEOUT

    @classmethod
    def from_env(cls, env: Env | None = None) -> CardImporter:
        env = env or Env()
        return cls(
            block_private=env.bool("AGENT_CARD_BLOCK_PRIVATE_URLS", False),
            timeout=env.float("AGENT_CARD_FETCH_TIMEOUT", FETCH_TIMEOUT, minimum=0.1),
        )

    async def fetch(self, url: str) -> tuple[str, Any]:
        """The card at `url` (or at its well-known paths when it has no path): the URL it was read at and its
        JSON. Every failure is an INVALID_ARGUMENT on card_url that says why."""
        v = agent_rules.Violations()
        agent_rules.check_url(v, "card_url", url, ("http", "https"), required=True)
        v.raise_if_any()
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise invalid("card_url", "must not carry user info")
        candidates = [url] if parts.path not in ("", "/") else [urljoin(url, p) for p in WELL_KNOWN]
        try:
            egress.check_url(url, self.block_private)
        except egress.EgressRefused as exc:
            raise invalid("card_url", str(exc)) from None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with egress.guarded_session(self.block_private, timeout=timeout) as session:
            for i, candidate in enumerate(candidates):
                status, found = await self._get(session, candidate)
                if status == 404 and i + 1 < len(candidates):
                    continue  # 1.0's path missing: try 0.3's
                if status != 200:
                    raise invalid("card_url", f"answered HTTP {status} at {candidate[:200]}")
                return candidate, found
        raise AssertionError("unreachable")

    async def _get(self, session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
        origin = _origin(url)
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    async with session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as r:
                        if r.status in (301, 302, 303, 307, 308):
                            target = urljoin(url, r.headers.get("Location", ""))
                            # A redirect elsewhere would let a card's host send the registry anywhere.
                            if _origin(target) != origin:
                                raise invalid("card_url", f"redirects to another origin ({target[:200]})")
                            url = target
                            continue
                        if r.status != 200:
                            return r.status, None
                        body = await _bounded(r)
                        try:
                            return 200, json.loads(body)
                        except (ValueError, RecursionError):
                            raise invalid("card_url", "did not answer JSON") from None
                raise invalid("card_url", f"redirects more than {MAX_REDIRECTS} times")
        except TimeoutError:
            raise invalid("card_url", f"did not answer within {self.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise invalid("card_url", f"could not be fetched: {exc}"[:300]) from None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port or (443 if parts.scheme == "https" else 80)


async def _bounded(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_CARD_BYTES:
        raise invalid("card_url", f"the card is larger than {MAX_CARD_BYTES} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > MAX_CARD_BYTES:
            raise invalid("card_url", f"the card is larger than {MAX_CARD_BYTES} bytes")
    text = bytes(body).decode("utf-8", "replace")
    if capability_schemas.nesting_depth(text) > capability_schemas.MAX_DEPTH:
        raise invalid("card_url", f"the card nests more than {capability_schemas.MAX_DEPTH} levels")
    return bytes(body)


def parse_card_text(text: str) -> Any:
    try:
        return capability_schemas.parse_json(text, MAX_CARD_BYTES)
    except ValueError as exc:
        raise invalid("card", str(exc)) from None


class _Reader:
    """Typed reads of untrusted card fields: a wrong type or an oversized list is a violation at its path."""

    def __init__(self) -> None:
        self.v = agent_rules.Violations()

    def text(self, obj: dict[str, Any], key: str, path: str, *, required: bool = False) -> str:
        value = obj.get(key)
        if value is None:
            if required:
                self.v.add(f"{path}.{key}", "is required")
            return ""
        if not isinstance(value, str):
            self.v.add(f"{path}.{key}", f"must be a string (got {type(value).__name__})")
            return ""
        return value

    def objects(self, obj: dict[str, Any], key: str, path: str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        value = obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.v.add(f"{path}.{key}", f"must be a list (got {type(value).__name__})")
            return []
        if len(value) > limit:
            self.v.add(f"{path}.{key}", f"at most {limit} entries (got {len(value)})")
            return []
        found = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                found.append((f"{path}.{key}[{i}]", item))
            else:
                self.v.add(f"{path}.{key}[{i}]", f"must be an object (got {type(item).__name__})")
        return found

    def strings(self, obj: dict[str, Any], key: str, path: str, limit: int) -> tuple[str, ...]:
        value = obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            self.v.add(f"{path}.{key}", "must be a list of strings")
            return ()
        if len(value) > limit:
            self.v.add(f"{path}.{key}", f"at most {limit} entries (got {len(value)})")
            return ()
        return tuple(dict.fromkeys(value))


def _semver(text: str) -> str:
    """Cards often write "1" or "1.2": read as 1.0.0 and 1.2.0; anything else must already be semver."""
    match = _VERSION_SHORT.fullmatch(text)
    if match:
        return f"{match.group(1)}.{match.group(2) or 0}.0"
    return text


def _interfaces(r: _Reader, card: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(path, binding, url) of each interface: 1.0's supportedInterfaces, else 0.3's url, preferredTransport and
    additionalInterfaces."""
    if "supportedInterfaces" in card:
        found = r.objects(card, "supportedInterfaces", "card", agent_rules.MAX_ENDPOINTS)
        return [(p, r.text(i, "protocolBinding", p) or "JSONRPC", r.text(i, "url", p, required=True)) for p, i in found]
    main = r.text(card, "url", "card")
    interfaces = [("card", r.text(card, "preferredTransport", "card") or "JSONRPC", main)] if main else []
    for p, i in r.objects(card, "additionalInterfaces", "card", agent_rules.MAX_ENDPOINTS):
        interfaces.append((p, r.text(i, "transport", p) or "JSONRPC", r.text(i, "url", p, required=True)))
    return interfaces


def _default_did(source_url: str, name: str) -> str:
    """did:web of the card's host (its port percent-encoded, as did:web writes it) and the agent's name."""
    parts = urlsplit(source_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}{quote(':')}{parts.port}"
    slug = _SLUG.sub("-", name.lower()).strip("-._")[:64] or "agent"
    return f"did:web:{host}:{slug}"


def spec_from_card(card: Any, *, source_url: str, did: str, sharing: str) -> agent_rules.AgentSpec:
    """The agent a card describes. Violations name the card's own fields (card.skills[2].id); the result is then
    checked by validate_spec like any other registration."""
    if not isinstance(card, dict):
        raise invalid("card", "must be a JSON object (an A2A AgentCard)")
    r = _Reader()
    name = r.text(card, "name", "card", required=True)
    if isinstance(card.get("name"), str):  # a missing or mistyped one is already reported
        agent_rules.check_text(r.v, "card.name", name, max_len=agent_rules.MAX_NAME, required=True)
    description = r.text(card, "description", "card")
    agent_rules.check_text(r.v, "card.description", description, max_len=agent_rules.MAX_DESCRIPTION, multiline=True)
    version = _semver(r.text(card, "version", "card", required=True))
    if version and not (len(version) <= agent_rules.MAX_VERSION and versions.is_semver(version)):
        r.v.add("card.version", f"must be a semantic version like 1.2.3 (got {version[:80]!r})")
    default_in = r.strings(card, "defaultInputModes", "card", agent_rules.MAX_MODES)
    default_out = r.strings(card, "defaultOutputModes", "card", agent_rules.MAX_MODES)

    endpoints: list[agent_rules.Endpoint] = []
    for path, binding, url in _interfaces(r, card):
        protocol = BINDINGS.get(binding.upper())
        if protocol is None:
            r.v.add(f"{path}.protocolBinding", f"must be one of {', '.join(BINDINGS)} (got {binding[:40]!r})")
            continue
        endpoint = agent_rules.Endpoint(protocol, url)
        if endpoint not in endpoints:
            endpoints.append(endpoint)

    capabilities = []
    for path, skill in r.objects(card, "skills", "card", agent_rules.MAX_CAPABILITIES):
        skill_id = r.text(skill, "id", path, required=True)
        if skill_id:
            agent_rules.check_pattern(
                r.v, f"{path}.id", skill_id, agent_rules.CAPABILITY_NAME, "1-128 letters, digits and ._/:-"
            )
        capabilities.append(
            agent_rules.Capability(
                kind="skill",
                name=skill_id,
                # Skills have no version of their own: they are offered by this version of the agent.
                version=version,
                description=r.text(skill, "description", path),
                title=r.text(skill, "name", path),
                tags=r.strings(skill, "tags", path, agent_rules.MAX_CAPABILITY_TAGS),
                input_modes=r.strings(skill, "inputModes", path, agent_rules.MAX_MODES) or default_in,
                output_modes=r.strings(skill, "outputModes", path, agent_rules.MAX_MODES) or default_out,
            )
        )
    r.v.raise_if_any()
    if not did:
        origin = source_url or (endpoints[0].url if endpoints else "")
        if not origin:
            raise invalid("did", "is required for a card given without a URL or interfaces")
        did = _default_did(origin, name)
    return agent_rules.AgentSpec(
        did=did,
        name=name,
        description=description,
        version=version,
        capabilities=tuple(capabilities),
        endpoints=tuple(endpoints),
        tags=("a2a",),
        sharing=sharing,
    )
