"""The one notion of "who is calling", whatever the credential: API key, bootstrap token, JWT or federation key."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from agentvault.common.auth import Role
from agentvault.common.errors import PermissionDenied, Unauthenticated

# RFC 6749 3.3 scope-token: printable ASCII except space, double quote and backslash.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
MAX_SCOPES = 64

ADMIN_SCOPE = "admin"
AGENTS_READ = "agents:read"
AGENTS_WRITE = "agents:write"
# Calling agents as the mesh: their auth configuration and (encrypted) secrets, through ResolveAgentAuth.
AGENTS_CONNECT = "agents:connect"
FEDERATION_ADMIN = "federation:admin"
FEDERATION_RESOLVE = "federation:resolve"
HEALTH_REPORT = "health:report"
MESSAGES_SEND = "messages:send"
# Writing policies and asking Explain; reading them (WatchPolicies) is POLICIES_READ, for the enforcing services.
POLICIES_ADMIN = "policies:admin"
POLICIES_READ = "policies:read"
# The enforcing services' control plane (ResolveTrust, RecordInteractions, ConsumeGrant, LogDecisions,
# CreateApproval): a service that enforces policies outside the registry.
POLICIES_ENFORCE = "policies:enforce"
TOOLS_INVOKE = "tools:invoke"
# Replacing the MCP-sourced tool capabilities of agents with an MCP endpoint (SyncMcpTools): the messaging
# service's catalog worker only; it can change nothing else of an agent.
TOOLS_SYNC = "tools:sync"

# What an API key may do, by its role: an admin key may do everything, a member key what members did before scopes.
ROLE_SCOPES: dict[Role, frozenset[str]] = {
    Role.ADMIN: frozenset({ADMIN_SCOPE}),
    Role.MEMBER: frozenset({AGENTS_READ, AGENTS_WRITE, MESSAGES_SEND, TOOLS_INVOKE}),
}
# A peer mesh sees only what is shared with it; its credential never carries more than reading.
PEER_SCOPES = frozenset({AGENTS_READ})


class Kind(enum.StrEnum):
    PERSON = "person"  # an API key or the bootstrap token
    AGENT = "agent"  # an OAuth client bound to an agent
    SERVICE = "service"  # a mesh service's own OAuth client
    PEER = "peer"  # another mesh, with the federation credential this mesh issued to it


def parse_scopes(value: str | Iterable[str]) -> frozenset[str]:
    """Scopes from the space-separated form of RFC 6749 (or an iterable); ValueError on a malformed one."""
    items = value.split() if isinstance(value, str) else list(value)
    if len(items) > MAX_SCOPES:
        raise ValueError(f"at most {MAX_SCOPES} scopes")
    for item in items:
        if not isinstance(item, str) or not _SCOPE_TOKEN.fullmatch(item):
            raise ValueError(f"malformed scope {str(item)[:40]!r}")
    return frozenset(items)


def format_scopes(scopes: Iterable[str]) -> str:
    """The space-separated form, sorted so equal sets print the same."""
    return " ".join(sorted(scopes))


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    `id` is what agents record as their owner: stable, unique and assigned by the mesh, never chosen by a caller
    (a person's principal id; a JWT's `sub`). `subject` names the caller in its credential (the token's `sub`,
    the API key's principal). `owner` is who answers for a non-person caller (the principal that registered its
    OAuth client); it grants nothing by itself. `name` is for display only. A role, when given, adds its scopes.
    """

    kind: Kind
    id: str
    subject: str = ""
    scopes: frozenset[str] = frozenset()
    owner: str = ""
    name: str = ""
    role: Role | None = None
    client_id: str = ""
    agent_id: str = ""
    # The API key or federation credential id, or the JWT's jti: what to name in logs and revoke.
    key_id: str = ""
    # RFC 8693 actor: who acts on behalf of `subject` after a token exchange.
    actor: str = ""
    # When the credential stops being valid (epoch seconds); None for credentials without an expiry.
    expires_at: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a principal needs its stable id")
        kind = Kind(self.kind)
        scopes = frozenset(self.scopes)
        if self.role is not None:
            scopes |= ROLE_SCOPES[Role(self.role)]
        if kind is Kind.PEER and ADMIN_SCOPE in scopes:
            # A peer mesh is never an admin here, whatever its credential says.
            raise ValueError("a peer cannot hold the admin scope")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "scopes", scopes)
        if not self.subject:
            object.__setattr__(self, "subject", self.id)

    @property
    def is_peer(self) -> bool:
        return self.kind is Kind.PEER

    @property
    def is_admin(self) -> bool:
        return not self.is_peer and ADMIN_SCOPE in self.scopes

    def has_scope(self, scope: str) -> bool:
        """Whether the caller may do what `scope` names; `admin` implies every scope."""
        return scope in self.scopes or self.is_admin

    def owns(self, owner: str) -> bool:
        """Whether this caller is the principal recorded as `owner`; a peer owns nothing here."""
        return not self.is_peer and self.id == owner


def person(id: str, name: str, role: Role, key_id: str = "") -> Principal:
    """A person with an API key or the bootstrap token: its scopes follow its role."""
    return Principal(Kind.PERSON, id, name=name, role=Role(role), key_id=key_id)


def peer(id: str, name: str, key_id: str = "") -> Principal:
    """Another mesh calling with the federation credential this mesh issued to it."""
    return Principal(Kind.PEER, id, name=name, scopes=PEER_SCOPES, key_id=key_id)


def require_principal(principal: Principal | None) -> Principal:
    if principal is None:
        raise Unauthenticated("this call needs a credential: Authorization: Bearer <token>", "CREDENTIAL_MISSING")
    return principal


def require_scope(principal: Principal | None, scope: str) -> Principal:
    """The principal when it holds `scope` (or `admin`); PermissionDenied SCOPE_REQUIRED naming the scope if not."""
    caller = require_principal(principal)
    if not caller.has_scope(scope):
        raise PermissionDenied(f"this call needs the scope {scope!r}", "SCOPE_REQUIRED", scope=scope)
    return caller
