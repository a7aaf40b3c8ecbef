"""Agents as plain data and the rules every agent satisfies: one place for the registry that stores them and
for every service that reads them (e.g. discovery validating peers' answers)."""

from __future__ import annotations

import ipaddress
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
MAX_PERMISSIONS = 32
MAX_CAPABILITY_TAGS = 20
MAX_CAPABILITY_TAG = 64
MAX_MODES = 16

DID = re.compile(r"^did:[a-z0-9]{1,32}:[A-Za-z0-9._%:-]{1,220}$")
AGENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TAG = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,63}$")
CAPABILITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")
# A permission a capability requires, e.g. an OAuth scope ("agents:read") or a URN: printable, no spaces.
PERMISSION = re.compile(r"^[\x21-\x7e]{1,128}$")
# A media type (RFC 6838 restricted names) or, as A2A cards often write, a bare type ("text").
MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}(?:/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63})?$")
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
    "auth",
)
OUTPUT_ONLY_FIELDS = ("id", "owner", "health_status", "create_time", "update_time")


@dataclass(frozen=True)
class Capability:
    kind: str
    name: str
    version: str = ""
    description: str = ""
    # JSON Schema documents as JSON text ("" when not stated), checked by capability_schemas.
    input_schema: str = ""
    output_schema: str = ""
    permissions: tuple[str, ...] = ()
    # As A2A skills describe themselves: a display name, labels and media types.
    title: str = ""
    tags: tuple[str, ...] = ()
    input_modes: tuple[str, ...] = ()
    output_modes: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "kind": self.kind, "name": self.name, "version": self.version, "description": self.description
        }  # fmt: skip
        # Only when set: capabilities stored before these fields existed read back equal.
        if self.input_schema:
            found["input_schema"] = self.input_schema
        if self.output_schema:
            found["output_schema"] = self.output_schema
        for name in ("permissions", "tags", "input_modes", "output_modes"):
            if getattr(self, name):
                found[name] = list(getattr(self, name))
        if self.title:
            found["title"] = self.title
        return found

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Capability:
        return cls(
            kind=str(data["kind"]),
            name=str(data["name"]),
            version=str(data.get("version", "")),
            description=str(data.get("description", "")),
            input_schema=str(data.get("input_schema", "")),
            output_schema=str(data.get("output_schema", "")),
            permissions=tuple(data.get("permissions") or ()),
            title=str(data.get("title", "")),
            tags=tuple(data.get("tags") or ()),
            input_modes=tuple(data.get("input_modes") or ()),
            output_modes=tuple(data.get("output_modes") or ()),
        )


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    url: str

    def as_json(self) -> dict[str, str]:
        return {"protocol": self.protocol, "url": self.url}


# How the mesh authenticates when it calls an agent (registry.v1.AgentAuthKind's words).
AUTH_NONE = "none"
AUTH_API_KEY = "api_key"
AUTH_BEARER = "bearer"
AUTH_OAUTH2 = "oauth2_client_credentials"
AUTH_MTLS = "mtls"
AUTH_KINDS = (AUTH_NONE, AUTH_API_KEY, AUTH_BEARER, AUTH_OAUTH2, AUTH_MTLS)
# The input field holding each kind's secret; kinds without one are absent.
AUTH_SECRET_FIELDS = {AUTH_API_KEY: "api_key", AUTH_BEARER: "bearer_token", AUTH_OAUTH2: "client_secret"}
# The fields each kind uses; every other field of AgentAuth must be left empty.
AUTH_FIELDS = (
    "api_key_header", "api_key", "bearer_token", "token_url", "client_id", "client_secret", "scopes", "audience",
    "token_endpoint_auth_method", "ca_pem",
)  # fmt: skip
AUTH_KIND_FIELDS: dict[str, frozenset[str]] = {
    AUTH_NONE: frozenset(),
    AUTH_API_KEY: frozenset({"api_key_header", "api_key", "ca_pem"}),
    AUTH_BEARER: frozenset({"bearer_token", "ca_pem"}),
    AUTH_OAUTH2: frozenset(
        {"token_url", "client_id", "client_secret", "scopes", "audience", "token_endpoint_auth_method", "ca_pem"}
    ),
    AUTH_MTLS: frozenset({"ca_pem"}),
}
DEFAULT_API_KEY_HEADER = "X-API-Key"
TOKEN_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
MAX_SECRET = 4096
MAX_CLIENT_ID = 256
MAX_AUDIENCE = 2048
MAX_AUTH_SCOPES = 64
MAX_CA_PEM = 16 * 1024
# RFC 9110 5.6.2 token: what an HTTP header name may be made of.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
# Headers the HTTP client itself owns: a key sent in one of these would break or smuggle the request.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive",
     "proxy-authorization", "proxy-connection", "expect", "content-type", "cookie"}
)  # fmt: skip
# A header value we put on the wire: visible ASCII, no spaces (so no folding or injection).
HEADER_SECRET = re.compile(r"^[\x21-\x7e]{1,4096}$")
# RFC 6749 VSCHAR (client id and secret): printable ASCII, spaces allowed.
VSCHAR = re.compile(r"^[\x20-\x7e]{1,4096}$")
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")
PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")


@dataclass(frozen=True)
class AgentAuth:
    """How the mesh authenticates to an agent. The three secrets are input only (plaintext as the caller sent
    them, "" when not sent); `secret_set` says whether one is stored, and a stored one is never read back here."""

    kind: str = AUTH_NONE
    api_key_header: str = ""
    token_url: str = ""
    client_id: str = ""
    scopes: tuple[str, ...] = ()
    audience: str = ""
    token_endpoint_auth_method: str = ""
    ca_pem: str = ""
    api_key: str = field(default="", repr=False)
    bearer_token: str = field(default="", repr=False)
    client_secret: str = field(default="", repr=False)
    secret_set: bool = False

    @property
    def secret(self) -> str:
        """The secret sent for this kind ("" when none was sent or the kind has none)."""
        name = AUTH_SECRET_FIELDS.get(self.kind)
        return str(getattr(self, name)) if name else ""

    @property
    def needs_secret(self) -> bool:
        return self.kind in AUTH_SECRET_FIELDS

    def as_json(self) -> dict[str, Any]:
        """The stored configuration: never a secret."""
        return {
            "kind": self.kind,
            "api_key_header": self.api_key_header,
            "token_url": self.token_url,
            "client_id": self.client_id,
            "scopes": list(self.scopes),
            "audience": self.audience,
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "ca_pem": self.ca_pem,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, secret_set: bool) -> AgentAuth:
        if not data:
            return cls()
        return cls(
            kind=str(data.get("kind") or AUTH_NONE),
            api_key_header=str(data.get("api_key_header", "")),
            token_url=str(data.get("token_url", "")),
            client_id=str(data.get("client_id", "")),
            scopes=tuple(data.get("scopes") or ()),
            audience=str(data.get("audience", "")),
            token_endpoint_auth_method=str(data.get("token_endpoint_auth_method", "")),
            ca_pem=str(data.get("ca_pem", "")),
            secret_set=secret_set,
        )

    def without_secrets(self) -> AgentAuth:
        return replace(self, api_key="", bearer_token="", client_secret="")

    def keeps_secret_of(self, stored: AgentAuth) -> bool:
        """Whether an update sending no secret may keep `stored`'s: same kind, and for OAuth the same token
        endpoint and client (a stored client secret is never sent to an address it was not given for)."""
        if not self.needs_secret or self.secret or not stored.secret_set or stored.kind != self.kind:
            return False
        if self.kind == AUTH_OAUTH2:
            return (self.token_url, self.client_id) == (stored.token_url, stored.client_id)
        return True


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def validate_auth(auth: AgentAuth, prefix: str = "agent.auth") -> AgentAuth:
    """Checks an agent's AgentAuth (each field bounded, only the fields of its kind); returns it normalized."""
    v = Violations()
    _check_auth(v, auth, prefix)
    v.raise_if_any()
    return _normalized_auth(auth)


def _normalized_auth(auth: AgentAuth) -> AgentAuth:
    if auth.kind == AUTH_API_KEY and not auth.api_key_header:
        auth = replace(auth, api_key_header=DEFAULT_API_KEY_HEADER)
    if auth.kind == AUTH_OAUTH2 and not auth.token_endpoint_auth_method:
        auth = replace(auth, token_endpoint_auth_method=TOKEN_AUTH_METHODS[0])
    return replace(auth, scopes=tuple(dict.fromkeys(auth.scopes)))


def _check_auth(v: Violations, auth: AgentAuth, prefix: str) -> None:
    if auth.kind not in AUTH_KINDS:
        v.add(f"{prefix}.kind", f"must be one of {', '.join(AUTH_KINDS)}")
        return
    # Fields set for a kind that does not use them are refused rather than silently stored.
    used = AUTH_KIND_FIELDS[auth.kind]
    for name in AUTH_FIELDS:
        if getattr(auth, name) and name not in used:
            v.add(f"{prefix}.{name}", f"is not used by kind {auth.kind}")
    secret_field = AUTH_SECRET_FIELDS.get(auth.kind)
    if secret_field is not None:
        secret = auth.secret
        if not secret and not auth.secret_set:
            v.add(f"{prefix}.{secret_field}", f"is required for kind {auth.kind}")
        elif secret and len(secret) > MAX_SECRET:
            v.add(f"{prefix}.{secret_field}", f"must be at most {MAX_SECRET} characters (got {len(secret)})")
        elif secret and not (VSCHAR if auth.kind == AUTH_OAUTH2 else HEADER_SECRET).fullmatch(secret):
            what = "printable ASCII" if auth.kind == AUTH_OAUTH2 else "printable ASCII without spaces"
            v.add(f"{prefix}.{secret_field}", f"must be {what}")
    if auth.kind == AUTH_API_KEY and auth.api_key_header:
        if not HEADER_NAME.fullmatch(auth.api_key_header):
            v.add(f"{prefix}.api_key_header", "must be an HTTP header name of 1-64 characters")
        elif auth.api_key_header.lower() in RESERVED_HEADERS or auth.api_key_header.lower().startswith("proxy-"):
            v.add(f"{prefix}.api_key_header", f"must not be {auth.api_key_header!r}, which the HTTP client sets")
    if auth.kind == AUTH_OAUTH2:
        _check_token_url(v, f"{prefix}.token_url", auth.token_url)
        if not auth.client_id:
            v.add(f"{prefix}.client_id", "is required for kind oauth2_client_credentials")
        elif len(auth.client_id) > MAX_CLIENT_ID or not VSCHAR.fullmatch(auth.client_id):
            v.add(f"{prefix}.client_id", f"must be 1-{MAX_CLIENT_ID} printable ASCII characters")
        if len(auth.scopes) > MAX_AUTH_SCOPES:
            v.add(f"{prefix}.scopes", f"at most {MAX_AUTH_SCOPES} scopes")
        for i, scope in enumerate(auth.scopes[:MAX_AUTH_SCOPES]):
            check_pattern(v, f"{prefix}.scopes[{i}]", scope, SCOPE_TOKEN, "an RFC 6749 scope token")
        check_text(v, f"{prefix}.audience", auth.audience, max_len=MAX_AUDIENCE)
        method = auth.token_endpoint_auth_method
        if method and method not in TOKEN_AUTH_METHODS:
            v.add(f"{prefix}.token_endpoint_auth_method", f"must be one of {', '.join(TOKEN_AUTH_METHODS)}")
    if auth.ca_pem:
        _check_ca_pem(v, f"{prefix}.ca_pem", auth.ca_pem)


def _check_token_url(v: Violations, path: str, url: str) -> None:
    before = len(v.items)
    check_url(v, path, url, ("http", "https"), required=True)
    if len(v.items) > before:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.username or parts.password:
        v.add(path, "must not carry user info (the client id and secret have their own fields)")
    elif parts.fragment:
        v.add(path, "must not have a fragment")
    elif parts.scheme == "http" and not _is_loopback(host):
        # The client secret travels in this request: plain http only on this host.
        v.add(path, "must be https (http only to a loopback address)")
    else:
        from agentvault.common import egress  # here: egress pulls in aiohttp, which plain validation does not need

        reason = egress.refused_reason(host, block_private=False)
        if reason:
            v.add(path, reason)


def _check_ca_pem(v: Violations, path: str, pem: str) -> None:
    if len(pem) > MAX_CA_PEM:
        v.add(path, f"must be at most {MAX_CA_PEM} characters (got {len(pem)})")
        return
    if not PEM_CERTIFICATE.search(pem) or _has_control(pem, allow_newlines=True):
        v.add(path, "must be PEM certificates (-----BEGIN CERTIFICATE-----)")
        return
    from cryptography import x509  # here: only agents with a CA of their own need it

    try:
        x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        v.add(path, "must be PEM certificates that parse")


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
    auth: AgentAuth = field(default_factory=AgentAuth)

    def merged(self, other: AgentSpec, paths: list[str]) -> AgentSpec:
        """This spec with the fields named in `paths` taken from `other`. A new `auth` that sends no secret keeps
        the stored one when AgentAuth.keeps_secret_of allows it; otherwise it has none (and validation says so)."""
        taken = {p: getattr(other, p) for p in paths}
        if "auth" in taken:
            taken["auth"] = replace(other.auth, secret_set=other.auth.keeps_secret_of(self.auth))
        return replace(self, **taken)


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
        if len(cap.permissions) > MAX_PERMISSIONS:
            v.add(f"{p}.permissions", f"at most {MAX_PERMISSIONS} permissions")
        for j, permission in enumerate(cap.permissions[:MAX_PERMISSIONS]):
            check_pattern(v, f"{p}.permissions[{j}]", permission, PERMISSION, "1-128 printable characters, no spaces")
        check_text(v, f"{p}.title", cap.title, max_len=MAX_NAME)
        if len(cap.tags) > MAX_CAPABILITY_TAGS:
            v.add(f"{p}.tags", f"at most {MAX_CAPABILITY_TAGS} tags")
        for j, tag in enumerate(cap.tags[:MAX_CAPABILITY_TAGS]):
            check_text(v, f"{p}.tags[{j}]", tag, max_len=MAX_CAPABILITY_TAG, required=True)
        for modes in ("input_modes", "output_modes"):
            values = getattr(cap, modes)
            if len(values) > MAX_MODES:
                v.add(f"{p}.{modes}", f"at most {MAX_MODES} media types")
            for j, mode in enumerate(values[:MAX_MODES]):
                check_pattern(v, f"{p}.{modes}[{j}]", mode, MEDIA_TYPE, "a media type like application/json")
        if cap.input_schema or cap.output_schema:
            from agentvault.common import capability_schemas  # here: jsonschema is only needed for schemas

            for name in ("input_schema", "output_schema"):
                capability_schemas.check_schema(v, f"{p}.{name}", getattr(cap, name))
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
    _check_auth(v, spec.auth, f"{prefix}.auth")
    v.raise_if_any()
    return replace(
        spec,
        auth=_normalized_auth(spec.auth),
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
