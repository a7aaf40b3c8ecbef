"""Agents as plain data and the rules every agent satisfies: one place for the registry that stores them and
for every service that reads them (e.g. discovery validating peers' answers)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from agentvault.common import versions
from agentvault.common.errors import FieldViolation, InvalidArgument

SHARING = ("private", "local", "federated")
CAPABILITY_KINDS = ("tool", "skill", "model")
PROTOCOLS = ("http", "websocket", "grpc", "a2a", "mcp")
HEALTH = ("unknown", "healthy", "degraded", "unhealthy")
ROLES = ("member", "admin")

MAX_NAME = 200
MAX_DESCRIPTION = 4096
MAX_DID = 255
MAX_VERSION = 64
MAX_URL = 2048
MAX_CAPABILITIES = 100
MAX_CAPABILITY_DESCRIPTION = 1024
MAX_ENDPOINTS = 20
MAX_TAGS = 50
MAX_SEARCH = 256

DID = re.compile(r"^did:[a-z0-9]{1,32}:[A-Za-z0-9._%:-]{1,220}$")
AGENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TAG = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,63}$")
CAPABILITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")
PRINCIPAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
URL_SCHEMES = {
    "http": ("http", "https"),
    "websocket": ("ws", "wss"),
    "grpc": ("grpc", "grpcs", "http", "https"),
    "a2a": ("http", "https"),
    "mcp": ("http", "https", "ws", "wss"),
}
# Fields a caller may set; everything else on an agent is output only.
WRITABLE_FIELDS = (
    "did",
    "name",
    "description",
    "version",
    "agent_type",
    "capabilities",
    "endpoints",
    "tags",
    "sharing",
    "health_check_url",
)
OUTPUT_ONLY_FIELDS = ("id", "owner", "health_status", "create_time", "update_time")


@dataclass(frozen=True)
class Capability:
    kind: str
    name: str
    version: str = ""
    description: str = ""

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "version": self.version, "description": self.description}


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    url: str

    def as_json(self) -> dict[str, str]:
        return {"protocol": self.protocol, "url": self.url}


@dataclass(frozen=True)
class AgentSpec:
    """The writable part of an agent, as a caller sends it."""

    did: str = ""
    name: str = ""
    description: str = ""
    version: str = ""
    agent_type: str = ""
    capabilities: tuple[Capability, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    tags: tuple[str, ...] = ()
    sharing: str = ""
    health_check_url: str = ""

    def merged(self, other: AgentSpec, paths: list[str]) -> AgentSpec:
        """This spec with the fields named in `paths` taken from `other`."""
        return replace(self, **{p: getattr(other, p) for p in paths})


@dataclass(frozen=True)
class Agent:
    id: str
    owner: str
    spec: AgentSpec
    health_status: str
    created_at: datetime
    updated_at: datetime


@dataclass
class Violations:
    """Collects every problem in a request so the caller learns all of them at once."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, path: str, description: str) -> None:
        self.items.append(FieldViolation(path, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


# Exactly the Unicode categories Cc (C0 and C1 controls) and Cs (surrogates); a character class is ~100x
# faster than asking unicodedata.category of every character, and every write and peer answer passes here.
# The class bodies are public (as regex escapes) so that the OpenAPI document states exactly these rules.
CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"
CONTROL_CHARS_BUT_WHITESPACE = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
_CONTROL = re.compile(f"[{CONTROL_CHARS}\ud800-\udfff]")
_CONTROL_BUT_WHITESPACE = re.compile(f"[{CONTROL_CHARS_BUT_WHITESPACE}\ud800-\udfff]")


def _has_control(text: str, allow_newlines: bool = False) -> bool:
    return (_CONTROL_BUT_WHITESPACE if allow_newlines else _CONTROL).search(text) is not None


def check_text(
    v: Violations, path: str, value: str, *, max_len: int, required: bool = False, multiline: bool = False
) -> None:
    if required and not value.strip():
        v.add(path, "is required")
    elif len(value) > max_len:
        v.add(path, f"must be at most {max_len} characters (got {len(value)})")
    elif _has_control(value, allow_newlines=multiline):
        v.add(path, "must not contain control characters")


def check_pattern(v: Violations, path: str, value: str, pattern: re.Pattern[str], what: str) -> None:
    # fullmatch: `$` alone would also accept the value followed by one newline.
    if not pattern.fullmatch(value):
        v.add(path, f"must be {what} (got {value[:80]!r})")


def check_url(v: Violations, path: str, value: str, schemes: tuple[str, ...], *, required: bool) -> None:
    if not value:
        if required:
            v.add(path, "is required")
        return
    if len(value) > MAX_URL:
        v.add(path, f"must be at most {MAX_URL} characters")
        return
    if any(ch.isspace() for ch in value) or _has_control(value):
        v.add(path, "must not contain spaces or control characters")
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        v.add(path, f"is not a valid URL (got {value[:80]!r})")
        return
    if parts.scheme not in schemes or not parts.hostname:
        v.add(path, f"must be an absolute {'/'.join(schemes)} URL (got {value[:80]!r})")


def validate_spec(spec: AgentSpec, prefix: str = "agent") -> AgentSpec:
    """Checks every field, returning the spec normalized (defaults filled, tags deduplicated)."""
    v = Violations()
    check_text(v, f"{prefix}.did", spec.did, max_len=MAX_DID, required=True)
    if spec.did and len(spec.did) <= MAX_DID:
        check_pattern(v, f"{prefix}.did", spec.did, DID, "a DID like did:web:example.com:agent")
    check_text(v, f"{prefix}.name", spec.name, max_len=MAX_NAME, required=True)
    check_text(v, f"{prefix}.description", spec.description, max_len=MAX_DESCRIPTION, multiline=True)
    if not spec.version:
        v.add(f"{prefix}.version", "is required")
    elif len(spec.version) > MAX_VERSION or not versions.is_semver(spec.version):
        v.add(f"{prefix}.version", f"must be a semantic version like 1.2.3 (got {spec.version[:80]!r})")
    if spec.agent_type:
        check_pattern(v, f"{prefix}.agent_type", spec.agent_type, AGENT_TYPE, "lowercase letters, digits, - and _")

    if len(spec.capabilities) > MAX_CAPABILITIES:
        v.add(f"{prefix}.capabilities", f"at most {MAX_CAPABILITIES} capabilities")
    seen: set[tuple[str, str]] = set()
    for i, cap in enumerate(spec.capabilities[:MAX_CAPABILITIES]):
        p = f"{prefix}.capabilities[{i}]"
        if cap.kind not in CAPABILITY_KINDS:
            v.add(f"{p}.kind", f"must be one of {', '.join(CAPABILITY_KINDS)}")
        if not cap.name:
            v.add(f"{p}.name", "is required")
        else:
            check_pattern(v, f"{p}.name", cap.name, CAPABILITY_NAME, "1-128 letters, digits and ._/:-")
        if cap.version and (len(cap.version) > MAX_VERSION or not versions.is_semver(cap.version)):
            v.add(f"{p}.version", f"must be a semantic version like 1.2.3 (got {cap.version[:80]!r})")
        check_text(v, f"{p}.description", cap.description, max_len=MAX_CAPABILITY_DESCRIPTION, multiline=True)
        if (cap.kind, cap.name) in seen:
            v.add(f"{p}.name", f"duplicate {cap.kind} {cap.name!r}")
        seen.add((cap.kind, cap.name))

    if len(spec.endpoints) > MAX_ENDPOINTS:
        v.add(f"{prefix}.endpoints", f"at most {MAX_ENDPOINTS} endpoints")
    for i, ep in enumerate(spec.endpoints[:MAX_ENDPOINTS]):
        p = f"{prefix}.endpoints[{i}]"
        if ep.protocol not in PROTOCOLS:
            v.add(f"{p}.protocol", f"must be one of {', '.join(PROTOCOLS)}")
            continue
        check_url(v, f"{p}.url", ep.url, URL_SCHEMES[ep.protocol], required=True)

    if len(spec.tags) > MAX_TAGS:
        v.add(f"{prefix}.tags", f"at most {MAX_TAGS} tags")
    for i, tag in enumerate(spec.tags[:MAX_TAGS]):
        check_pattern(v, f"{prefix}.tags[{i}]", tag, TAG, "1-64 lowercase letters, digits and ._:-")

    if spec.sharing and spec.sharing not in SHARING:
        v.add(f"{prefix}.sharing", f"must be one of {', '.join(SHARING)}")
    check_url(v, f"{prefix}.health_check_url", spec.health_check_url, ("http", "https"), required=False)
    v.raise_if_any()
    return replace(
        spec,
        name=spec.name.strip(),
        tags=tuple(dict.fromkeys(spec.tags)),
        sharing=spec.sharing or "local",
    )


def validate_update_mask(paths: list[str], prefix: str = "update_mask") -> list[str]:
    """The writable fields named by an update mask; an empty mask means every writable field."""
    if not paths:
        return list(WRITABLE_FIELDS)
    v = Violations()
    for path in paths:
        if path in OUTPUT_ONLY_FIELDS:
            v.add(prefix, f"{path!r} is output only and cannot be updated")
        elif path not in WRITABLE_FIELDS:
            v.add(prefix, f"unknown field {path!r}; updatable: {', '.join(WRITABLE_FIELDS)}")
    v.raise_if_any()
    return list(dict.fromkeys(paths))


@dataclass(frozen=True)
class AgentQuery:
    """What ListAgents filters on; `search` switches ordering to relevance."""

    search: str = ""
    agent_type: str = ""
    tag: str = ""
    capability_kind: str = ""
    capability_name: str = ""
    capability_version: versions.Constraint | None = None
    owner: str = ""
    sharing: str = ""
    has_health_check_url: bool = False

    def fingerprint(self) -> str:
        constraint = self.capability_version.text if self.capability_version else ""
        return "\x1f".join(
            (
                self.search,
                self.agent_type,
                self.tag,
                self.capability_kind,
                self.capability_name,
                constraint,
                self.owner,
                self.sharing,
                str(self.has_health_check_url),
            )
        )


def build_query(raw: dict[str, Any]) -> AgentQuery:
    v = Violations()
    search = str(raw.get("search", ""))
    check_text(v, "search", search, max_len=MAX_SEARCH)
    agent_type = str(raw.get("agent_type", ""))
    if agent_type:
        check_pattern(v, "agent_type", agent_type, AGENT_TYPE, "lowercase letters, digits, - and _")
    tag = str(raw.get("tag", ""))
    if tag:
        check_pattern(v, "tag", tag, TAG, "1-64 lowercase letters, digits and ._:-")
    cap_name = str(raw.get("capability_name", ""))
    if cap_name:
        check_pattern(v, "capability_name", cap_name, CAPABILITY_NAME, "1-128 letters, digits and ._/:-")
    constraint = None
    cap_version = str(raw.get("capability_version", ""))
    if cap_version:
        try:
            constraint = versions.parse_constraint(cap_version)
        except versions.ConstraintError as exc:
            v.add("capability_version", f"invalid version constraint: {exc}")
        if not cap_name:
            v.add("capability_version", "needs capability_name")
    owner = str(raw.get("owner", ""))
    if owner:
        check_pattern(v, "owner", owner, PRINCIPAL_NAME, "a principal name")
    v.raise_if_any()
    return AgentQuery(
        search=search.strip(),
        agent_type=agent_type,
        tag=tag,
        capability_kind=str(raw.get("capability_kind", "")),
        capability_name=cap_name,
        capability_version=constraint,
        owner=owner,
        sharing=str(raw.get("sharing", "")),
        has_health_check_url=bool(raw.get("has_health_check_url", False)),
    )
