"""What the services enforce on each request field, as JSON Schema keywords for the OpenAPI document.

Stated from the rules themselves (agentvault.common.agents and .versions), so that the document cannot drift from
them. Fields without an entry carry only what their proto type says.
"""

from __future__ import annotations

import re
from typing import Any

from agentvault.common import agents as rules
from agentvault.common import capability_schemas, invitations, oauth, policy, versions
from agentvault.common.policy import api as policy_api

# Characters str.isspace() counts that are not control characters (those are refused anyway): what str.strip()
# removes from a required text, spelled out because a fuzzer may read `\s` as ASCII only.
SPACES = r" \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Python's `$` also matches before a final newline, ECMA-262's does not; Python-based fuzzers read the
# patterns with Python's re, so every pattern ends with this, which means the same in both.
_END = r"$(?!\n)"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_UUID = {"type": "string", "format": "uuid"}
# The registry's check on API key and federation credential ids (the visible part of a token).
_KEY_ID = {"minLength": 1, "maxLength": 32}
REGISTRY = "agentvault.registry.v1."
_FED = "agentvault.federation.v1."
_DISC = "agentvault.discovery.v1."
_HEALTH = "agentvault.healthmonitor.v1."
_ID = "agentvault.identity.v1."
_POLICY = "agentvault.policy.v1."
_MSG = "agentvault.messaging.v1."
_UUID_TEXT = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def _inner(pattern: re.Pattern[str] | str) -> str:
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    if not (text.startswith("^") and text.endswith("$")):
        raise ValueError(f"pattern {text!r} must be anchored with ^ and $")
    return text[1:-1]


def whole(pattern: re.Pattern[str] | str) -> str:
    """The pattern matching whole values only, in ECMA-262 and in Python alike."""
    return f"^(?:{_inner(pattern)}){_END}"


def optional(pattern: re.Pattern[str] | str) -> str:
    """Like `whole`, also allowing "": proto3's unset string."""
    return f"^(?:{_inner(pattern)})?{_END}"


def text_schema(max_len: int, *, required: bool = False, multiline: bool = False) -> dict[str, Any]:
    """agents.check_text's rule: at most max_len characters, no control characters; required: not blank."""
    ctrl = rules.CONTROL_CHARS_BUT_WHITESPACE if multiline else rules.CONTROL_CHARS
    if required:
        pattern = f"^[^{ctrl}]*[^{SPACES}{ctrl}\\t\\n\\v\\f\\r][^{ctrl}]*{_END}"
        return {"type": "string", "minLength": 1, "maxLength": max_len, "pattern": pattern}
    return {"type": "string", "maxLength": max_len, "pattern": f"^[^{ctrl}]*{_END}"}


def url_schema(schemes: tuple[str, ...], *, required: bool) -> dict[str, Any]:
    """A subset of what agents.check_url accepts: absolute, a host name, a valid port, no spaces or controls.
    (The check also takes user info and IPv6 literals; this pattern leaves them out for brevity.)"""
    url = (
        f"(?:{'|'.join(schemes)})://[A-Za-z0-9.-]+(?::{_PORT})?"
        f"(?:[/?#][^{SPACES}{rules.CONTROL_CHARS}\\t\\n\\v\\f\\r]*)?"
    )
    pattern = f"^{url}{_END}" if required else f"^(?:{url})?{_END}"
    schema: dict[str, Any] = {"type": "string", "maxLength": rules.MAX_URL, "pattern": pattern}
    if required:
        schema["minLength"] = 1
    return schema


def _semver(*, required: bool) -> dict[str, Any]:
    pattern = whole(versions.SEMVER) if required else optional(versions.SEMVER)
    return {"type": "string", "maxLength": rules.MAX_VERSION, "pattern": pattern}


def _mask(fields: tuple[str, ...]) -> dict[str, Any]:
    # Each path in its proto (snake_case) form; empty entries are skipped, an empty mask means every field.
    one = "|".join(fields)
    return {
        "type": "string",
        "pattern": f"^(?:{one})?(?:,(?:{one})?)*{_END}",
        "description": f"Comma-separated fields to change, of: {', '.join(fields)}. Empty: every field.",
    }


def _json_text(max_bytes: int, what: str) -> dict[str, Any]:
    # JSON inside a string: JSON Schema cannot state that the text parses, only its bounds.
    return {
        "maxLength": max_bytes,
        "description": f"{what} as JSON text: at most {max_bytes} bytes, nested at most "
        f"{capability_schemas.MAX_DEPTH} deep; empty: not stated.",
    }


def _page_size() -> dict[str, Any]:
    # Larger sizes are coerced to the maximum, so no maximum is stated; negative ones are refused.
    return {"minimum": 0}


def _filters(prefix: str) -> dict[tuple[str, str], dict[str, Any]]:
    """agents.build_query's rules for the search filters ListAgents, discovery and federation share."""
    return {
        (prefix, "search"): text_schema(rules.MAX_SEARCH),
        (prefix, "agent_type"): {"pattern": optional(rules.AGENT_TYPE)},
        (prefix, "tag"): {"pattern": optional(rules.TAG)},
        (prefix, "capability_name"): {"pattern": optional(rules.CAPABILITY_NAME)},
        (prefix, "capability_version"): {
            "maxLength": versions.MAX_CONSTRAINT_LENGTH,
            "description": "A version constraint, e.g. >=1.2,<2 or ^1.4 or 1.x; needs capability_name.",
        },
        (prefix, "page_size"): _page_size(),
    }


def constraints() -> dict[tuple[str, str], dict[str, Any]]:
    """Extra schema keywords by (message full name, field name): what the services check beyond the type."""
    agent = REGISTRY + "Agent"
    found: dict[tuple[str, str], dict[str, Any]] = {
        (agent, "id"): _UUID,
        (agent, "did"): {"minLength": 1, "maxLength": rules.MAX_DID, "pattern": whole(rules.DID)},
        (agent, "name"): text_schema(rules.MAX_NAME, required=True),
        (agent, "description"): text_schema(rules.MAX_DESCRIPTION, multiline=True),
        (agent, "version"): _semver(required=True),
        (agent, "agent_type"): {"pattern": optional(rules.AGENT_TYPE)},
        (agent, "capabilities"): {"maxItems": rules.MAX_CAPABILITIES},
        (agent, "endpoints"): {"maxItems": rules.MAX_ENDPOINTS},
        (agent, "tags"): {"maxItems": rules.MAX_TAGS},
        (agent, "tags[]"): {"pattern": whole(rules.TAG)},
        (agent, "health_check_url"): url_schema(("http", "https"), required=False),
        (REGISTRY + "Capability", "name"): {"pattern": whole(rules.CAPABILITY_NAME)},
        (REGISTRY + "Capability", "version"): _semver(required=False),
        (REGISTRY + "Capability", "description"): text_schema(rules.MAX_CAPABILITY_DESCRIPTION, multiline=True),
        (REGISTRY + "Capability", "input_schema"): _json_text(capability_schemas.MAX_SCHEMA_BYTES, "A JSON Schema"),
        (REGISTRY + "Capability", "output_schema"): _json_text(capability_schemas.MAX_SCHEMA_BYTES, "A JSON Schema"),
        (REGISTRY + "Capability", "permissions"): {"maxItems": rules.MAX_PERMISSIONS},
        (REGISTRY + "Capability", "permissions[]"): {"pattern": whole(rules.PERMISSION)},
        (REGISTRY + "Capability", "title"): text_schema(rules.MAX_NAME),
        (REGISTRY + "Capability", "tags"): {"maxItems": rules.MAX_CAPABILITY_TAGS},
        (REGISTRY + "Capability", "tags[]"): text_schema(rules.MAX_CAPABILITY_TAG, required=True),
        (REGISTRY + "Capability", "input_modes"): {"maxItems": rules.MAX_MODES},
        (REGISTRY + "Capability", "input_modes[]"): {"pattern": whole(rules.MEDIA_TYPE)},
        (REGISTRY + "Capability", "output_modes"): {"maxItems": rules.MAX_MODES},
        (REGISTRY + "Capability", "output_modes[]"): {"pattern": whole(rules.MEDIA_TYPE)},
        (REGISTRY + "ImportAgentCardRequest", "card_url"): url_schema(("http", "https"), required=False),
        (REGISTRY + "ImportAgentCardRequest", "card"): _json_text(
            capability_schemas.MAX_CARD_BYTES, "An A2A AgentCard"
        ),
        (REGISTRY + "ImportAgentCardRequest", "did"): {"maxLength": rules.MAX_DID, "pattern": optional(rules.DID)},
        (REGISTRY + "GetAgentCardRequest", "id"): _UUID,
        (REGISTRY + "CheckCompatibilityRequest", "agent_id"): _UUID,
        (REGISTRY + "CheckCompatibilityRequest", "name"): {"minLength": 1, "pattern": whole(rules.CAPABILITY_NAME)},
        (REGISTRY + "CheckCompatibilityRequest", "version_constraint"): {
            "maxLength": versions.MAX_CONSTRAINT_LENGTH,
            "description": "A version constraint, e.g. >=1.2,<2 or ^1.4 or 1.x; empty accepts any version.",
        },
        (REGISTRY + "CheckCompatibilityRequest", "input"): _json_text(capability_schemas.MAX_INPUT_BYTES, "JSON"),
        (REGISTRY + "CheckCompatibilityRequest", "expected_output_schema"): _json_text(
            capability_schemas.MAX_SCHEMA_BYTES, "A JSON Schema"
        ),
        (REGISTRY + "Endpoint", "url"): {"minLength": 1, "maxLength": rules.MAX_URL},
        (REGISTRY + "GetAgentRequest", "id"): _UUID,
        (REGISTRY + "DeleteAgentRequest", "id"): _UUID,
        (REGISTRY + "UpdateAgentRequest", "update_mask"): _mask(rules.WRITABLE_FIELDS),
        (REGISTRY + "ListAgentsRequest", "owner"): {"pattern": optional(rules.PRINCIPAL_NAME)},
        (REGISTRY + "ListAgentsRequest", "limit"): _page_size(),
        (REGISTRY + "CreateApiKeyRequest", "name"): {"minLength": 1, "pattern": whole(rules.PRINCIPAL_NAME)},
        (REGISTRY + "ListApiKeysRequest", "page_size"): _page_size(),
        (REGISTRY + "RevokeApiKeyRequest", "id"): _KEY_ID,
        (_FED + "RevokeFederationCredentialRequest", "id"): _KEY_ID,
        (_FED + "Peer", "id"): _UUID,
        (_FED + "GetPeerRequest", "peer_id"): _UUID,
        (_FED + "DeletePeerRequest", "peer_id"): _UUID,
        (_FED + "ListPeersRequest", "page_size"): _page_size(),
        (_FED + "ListFederationCredentialsRequest", "page_size"): _page_size(),
        (_FED + "CreateFederationInvitationRequest", "name"): {"minLength": 1, "pattern": whole(invitations.NAME)},
        (_FED + "CreateFederationInvitationRequest", "ttl_seconds"): {"minimum": 0, "maximum": invitations.MAX_TTL},
        (_FED + "ListFederationInvitationsRequest", "page_size"): _page_size(),
        (_FED + "DeleteFederationInvitationRequest", "id"): _UUID,
        (_DISC + "ClearPeerCacheRequest", "peer_id"): _UUID,
        (_HEALTH + "GetPeerHealthHistoryRequest", "peer_id"): _UUID,
        # The health monitor's own checks: 0 means its default, larger values are coerced to its maximum.
        (_HEALTH + "GetPeerHealthHistoryRequest", "window_seconds"): {"minimum": 0},
        (_HEALTH + "GetPeerHealthHistoryRequest", "limit"): {"minimum": 0},
        (_HEALTH + "GetAgentHealthHistoryRequest", "agent_id"): _UUID,
        (_HEALTH + "GetAgentHealthHistoryRequest", "limit"): {"minimum": 0},
        (_ID + "CreateOAuthClientRequest", "name"): text_schema(oauth.MAX_CLIENT_NAME, required=True),
        (_ID + "CreateOAuthClientRequest", "scopes"): {"minItems": 1},
        (_ID + "CreateOAuthClientRequest", "scopes[]"): {"enum": list(oauth.KNOWN_SCOPES)},
        (_ID + "CreateOAuthClientRequest", "grant_types[]"): {"enum": list(oauth.GRANT_TYPES)},
        (_ID + "CreateOAuthClientRequest", "token_endpoint_auth_method"): {"enum": ["", *oauth.AUTH_METHODS]},
        (_ID + "CreateOAuthClientRequest", "agent_id"): {"pattern": optional(_UUID_TEXT)},
        (_ID + "CreateOAuthClientRequest", "jwks"): {
            "maxLength": oauth.MAX_JWKS_BYTES,
            "description": "A JSON JWK Set of public EC or OKP keys (at most 8 KiB); required for private_key_jwt.",
        },
        (_ID + "ListOAuthClientsRequest", "page_size"): _page_size(),
    }
    found.update(_auth_constraints())
    found.update(_policy_constraints())
    found.update(_messaging_constraints())
    found.update(_filters(REGISTRY + "ListAgentsRequest"))
    found.update(_filters(_DISC + "SearchAgentsRequest"))
    found.update(_filters(_FED + "SearchAgentsRequest"))
    return found


def _policy_constraints() -> dict[tuple[str, str], dict[str, Any]]:
    """The registry's policy_servicer checks (the Cedar text itself JSON Schema cannot state)."""
    caller, target = _POLICY + "ExplainCaller", _POLICY + "ExplainTarget"
    text: dict[str, Any] = {"maxLength": policy_api.MAX_FIELD}
    found: dict[tuple[str, str], dict[str, Any]] = {
        (_POLICY + "GetPolicyRequest", "id"): _UUID,
        (_POLICY + "DeletePolicyRequest", "id"): _UUID,
        (_POLICY + "ListPoliciesRequest", "page_size"): _page_size(),
        (_POLICY + "ExplainRequest", "action"): {"enum": list(policy.ACTIONS)},
        (caller, "kind"): {"enum": ["", *policy_api.CALLER_TYPES]},
        (caller, "trust_level"): {"enum": ["", *(t.value for t in policy.Trust)]},
        (caller, "id"): {"minLength": 1, **text},
        (caller, "scopes"): {"maxItems": policy_api.MAX_ITEMS},
        (target, "agent_id"): {"minLength": 1, **text},
        (target, "tags"): {"maxItems": policy_api.MAX_ITEMS},
        (_POLICY + "ExplainContext", "time"): {"minimum": 0, "maximum": policy_api.MAX_TIME},
    }
    for name in ("mesh", "owner", "scopes[]"):
        found[(caller, name)] = text
    for name in ("name", "version", "capability_kind", "owner", "mesh", "tags[]"):
        found[(target, name)] = text
    found.update(_access_constraints())
    return found


def _access_constraints() -> dict[tuple[str, str], dict[str, Any]]:
    """The registry's access checks: connections, permission requests, approvals, grants, the decision log."""
    trust = [t.value for t in policy.Trust]
    note = text_schema(policy_api.MAX_NOTE, multiline=True)
    found: dict[tuple[str, str], dict[str, Any]] = {
        (_POLICY + "ListConnectionsRequest", "trust_level"): {"enum": ["", *trust]},
        (_POLICY + "ListConnectionsRequest", "agent_id"): {"pattern": f"^(?:-|{_UUID_TEXT[1:-1]})?$"},
        (_POLICY + "SetTrustLevelRequest", "trust_level"): {"enum": trust},
        (_POLICY + "SetTrustLevelRequest", "reason"): text_schema(policy_api.MAX_NOTE, required=True),
        (_POLICY + "ListTrustChangesRequest", "connection_id"): _UUID,
        (_POLICY + "RequestCapabilityRequest", "agent_id"): _UUID,
        (_POLICY + "RequestCapabilityRequest", "capability"): {"minLength": 1, "pattern": whole(rules.CAPABILITY_NAME)},
        (_POLICY + "RequestCapabilityRequest", "kind"): {"enum": ["", *policy_api.CAPABILITY_KINDS]},
        (_POLICY + "RequestCapabilityRequest", "version_constraint"): {
            "maxLength": versions.MAX_CONSTRAINT_LENGTH,
            "description": "A version constraint, e.g. >=1.2,<2 or ^1.4 or 1.x; empty accepts any version.",
        },
        (_POLICY + "RequestCapabilityRequest", "purpose"): text_schema(policy_api.MAX_PURPOSE, multiline=True),
        (_POLICY + "RequestCapabilityRequest", "max_calls"): {"minimum": 0, "maximum": policy_api.MAX_CALLS},
        (_POLICY + "RequestCapabilityRequest", "duration_seconds"): {"minimum": 0, "maximum": policy_api.MAX_DURATION},
        (_POLICY + "RequestCapabilityRequest", "wait_seconds"): {"minimum": 0, "maximum": policy_api.MAX_WAIT},
        (_POLICY + "ListApprovalsRequest", "status"): {"enum": ["", *policy_api.APPROVAL_STATUSES]},
        (_POLICY + "ApproveApprovalRequest", "duration_seconds"): {"minimum": 0, "maximum": policy_api.MAX_DURATION},
        (_POLICY + "ApproveApprovalRequest", "uses"): {"minimum": 0, "maximum": policy_api.MAX_CALLS},
        (_POLICY + "ApproveApprovalRequest", "note"): note,
        (_POLICY + "DenyApprovalRequest", "note"): note,
        (_POLICY + "ListDecisionsRequest", "outcome"): {"enum": ["", "allow", "deny", "ask"]},
    }
    for message in ("GetConnectionRequest", "SetTrustLevelRequest", "GetApprovalRequest", "ApproveApprovalRequest"):
        found[(_POLICY + message, "id")] = _UUID
    for message in ("DenyApprovalRequest", "RevokeGrantRequest"):
        found[(_POLICY + message, "id")] = _UUID
    for message in ("ListConnections", "ListTrustChanges", "ListApprovals", "ListGrants", "ListDecisions"):
        found[(_POLICY + message + "Request", "page_size")] = _page_size()
    return found


# The messaging service's rules (agentvault_messaging.model; a service package the edge does not import, so they
# are restated here, and tests/messaging/test_edge_messages.py checks the service against them).
MESSAGE_ID_TEXT = r"^[\x21-\x7e]{1,128}$"  # conversation, correlation, task ids, idempotency keys
MESSAGE_STATUSES = ("held", "accepted", "delivered", "acknowledged", "failed", "dead_lettered", "expired", "refused")
MESSAGE_HEADER_NAME = r"^[A-Za-z0-9._-]{1,128}$"
MAX_MESSAGE_PARTS = 64
MAX_MESSAGE_HEADERS = 32
MAX_MESSAGE_HEADER_VALUE = 1024
MAX_MESSAGE_LIST = 16
MAX_WAIT = 60  # AwaitReply
MAX_LONG_POLL = 20  # ReceiveMessages
MAX_RECEIVE = 100
MAX_VISIBILITY = 43_200
MAX_IN_FLIGHT = 1000


_CONTENT: dict[str, dict[str, Any]] = {
    "text": {"type": "string"},
    "raw": {"type": "string"},
    "url": {"type": "string", "minLength": 1},
    "data": {},
}


def _one_content(kind: str) -> dict[str, Any]:
    others = {other: {"type": "null"} for other in _CONTENT if other != kind}
    return {"required": [kind], "properties": {kind: _CONTENT[kind], **others}}


def _messaging_constraints() -> dict[tuple[str, str], dict[str, Any]]:
    """MessagingService's checks (servicer.py and model.check)."""
    message, part, party = _MSG + "Message", _MSG + "Part", _MSG + "Party"
    some_uuid = {"pattern": optional(_UUID_TEXT)}
    some_id = {"maxLength": 128, "pattern": optional(MESSAGE_ID_TEXT)}
    found: dict[tuple[str, str], dict[str, Any]] = {
        (message, "id"): some_uuid,
        (message, "format_version"): {"enum": ["", "1"]},
        (message, "in_reply_to"): some_uuid,
        (message, "role"): {"enum": ["", "user", "agent"]},
        (message, "parts"): {"minItems": 1, "maxItems": MAX_MESSAGE_PARTS},
        # Exactly one kind of content (the others absent or null); `data` holds any JSON value, null too.
        (message, "parts[]"): {"oneOf": [_one_content(kind) for kind in _CONTENT]},
        (message, "headers"): {
            "maxProperties": MAX_MESSAGE_HEADERS,
            "propertyNames": {"pattern": whole(MESSAGE_HEADER_NAME)},
            "additionalProperties": text_schema(MAX_MESSAGE_HEADER_VALUE),
        },
        (message, "extensions"): {"maxItems": MAX_MESSAGE_LIST},
        (message, "extensions[]"): text_schema(256, required=True),
        (message, "reference_task_ids"): {"maxItems": MAX_MESSAGE_LIST},
        (message, "reference_task_ids[]"): text_schema(256, required=True),
        (part, "url"): url_schema(("http", "https"), required=False),
        (part, "filename"): text_schema(rules.MAX_NAME),
        (part, "media_type"): text_schema(rules.MAX_NAME),
        (party, "agent_id"): some_uuid,
        (party, "did"): text_schema(rules.MAX_DID),
        (party, "mesh"): text_schema(255),
        (_MSG + "GetWebhookSecretRequest", "agent_id"): _UUID,
        (_MSG + "ListMessagesRequest", "page_size"): _page_size(),
        (_MSG + "ListMessagesRequest", "conversation_id"): {"maxLength": 128},
        (_MSG + "ListMessagesRequest", "correlation_id"): {"maxLength": 128},
        (_MSG + "ListMessagesRequest", "agent_id"): some_uuid,
        (_MSG + "ListMessagesRequest", "status"): {"enum": ["", *MESSAGE_STATUSES]},
        (_MSG + "AwaitReplyRequest", "wait_seconds"): {"minimum": 0, "maximum": MAX_WAIT},
        (_MSG + "WatchMessagesRequest", "id"): some_uuid,
        (_MSG + "WatchMessagesRequest", "conversation_id"): {"maxLength": 128},
        (_MSG + "WatchMessagesRequest", "agent_id"): some_uuid,
        (_MSG + "ReceiveMessagesRequest", "agent_id"): some_uuid,
        (_MSG + "ReceiveMessagesRequest", "max_messages"): {"minimum": 0, "maximum": MAX_RECEIVE},
        (_MSG + "ReceiveMessagesRequest", "visibility_timeout_seconds"): {"minimum": 0, "maximum": MAX_VISIBILITY},
        (_MSG + "ReceiveMessagesRequest", "wait_seconds"): {"minimum": 0, "maximum": MAX_LONG_POLL},
        (_MSG + "ReceiveMessagesRequest", "instance"): some_id,  # an instance label (sessions.py)
        (_MSG + "NackMessageRequest", "delay_seconds"): {"minimum": 0, "maximum": MAX_VISIBILITY},
        (_MSG + "NackMessageRequest", "reason"): text_schema(1024),
        (_MSG + "AckMessagesRequest", "receipts"): {"minItems": 1, "maxItems": MAX_IN_FLIGHT},
        (_MSG + "StreamInboxRequest", "agent_id"): some_uuid,
        (_MSG + "StreamInboxRequest", "max_in_flight"): {"minimum": 0, "maximum": MAX_IN_FLIGHT},
        (_MSG + "StreamInboxRequest", "visibility_timeout_seconds"): {"minimum": 0, "maximum": MAX_VISIBILITY},
        (_MSG + "StreamInboxRequest", "instance"): some_id,
        (_MSG + "ListDeadLettersRequest", "page_size"): _page_size(),
        (_MSG + "ListDeadLettersRequest", "agent_id"): some_uuid,
        (_MSG + "PurgeDeadLettersRequest", "agent_id"): some_uuid,
        (_MSG + "AppendPartsRequest", "message_id"): _UUID,
        (_MSG + "AppendPartsRequest", "first_index"): {"minimum": 1},
        (_MSG + "AppendPartsRequest", "parts"): {"maxItems": MAX_MESSAGE_PARTS},
        (_MSG + "AppendPartsRequest", "parts[]"): {"oneOf": [_one_content(kind) for kind in _CONTENT]},
        (_MSG + "AppendPartsRequest", "abort_reason"): text_schema(1024),
        (_MSG + "StreamPartsRequest", "message_id"): _UUID,
        (_MSG + "StreamPartsRequest", "after_index"): {"minimum": 0},
    }
    for name in ("conversation_id", "correlation_id", "idempotency_key", "task_id"):
        found[(message, name)] = some_id
    for name in ("GetMessageRequest", "AwaitReplyRequest", "ReplayDeadLetterRequest"):
        found[(_MSG + name, "id")] = _UUID
    for name in ("AckMessageRequest", "NackMessageRequest"):
        found[(_MSG + name, "message_id")] = _UUID
        found[(_MSG + name, "receipt")] = _UUID
    found.update(_session_constraints())
    return found


def _session_constraints() -> dict[tuple[str, str], dict[str, Any]]:
    """SessionService's checks (agentvault_messaging/sessions.py); a state is a JSON document inside a string."""
    label = {"maxLength": 128, "pattern": optional(MESSAGE_ID_TEXT)}
    digest = {"pattern": "^[0-9a-fA-F]{64}$"}
    found: dict[tuple[str, str], dict[str, Any]] = {
        (_MSG + "Session", "conversation_id"): {"minLength": 1, "maxLength": 128, "pattern": whole(MESSAGE_ID_TEXT)},
        (_MSG + "Session", "owner_instance"): label,
        (_MSG + "HandoffTarget", "agent_id"): _UUID,
        (_MSG + "HandoffTarget", "instance"): label,
        (_MSG + "HandoffTarget", "mesh"): {"maxLength": 0},
        (_MSG + "InitiateHandoffRequest", "session_id"): _UUID,
        (_MSG + "InitiateHandoffRequest", "instance"): label,
        (_MSG + "InitiateHandoffRequest", "note"): {"maxLength": 1024},
        (_MSG + "AcceptHandoffRequest", "state_sha256"): digest,
        (_MSG + "AcceptHandoffRequest", "signature"): digest,
        (_MSG + "AcceptHandoffRequest", "instance"): label,
        (_MSG + "RejectHandoffRequest", "reason"): {"maxLength": 1024},
        (_MSG + "ListHandoffsRequest", "session_id"): {"pattern": optional(_UUID_TEXT)},
        (_MSG + "ListHandoffsRequest", "status"): {
            "enum": ["", "held", "offered", "accepted", "rejected", "cancelled", "expired", "refused"]
        },
        (_MSG + "ListHandoffsRequest", "page_size"): {"minimum": 0, "maximum": 100},
    }
    for name in ("GetSessionRequest", "UpdateSessionStateRequest", "ListSessionOwnersRequest"):
        found[(_MSG + name, "id")] = _UUID
    for name in ("AcceptHandoffRequest", "RejectHandoffRequest", "CancelHandoffRequest", "GetHandoffRequest"):
        found[(_MSG + name, "id")] = _UUID
    return found


def request_objects() -> dict[str, dict[str, Any]]:
    """Extra schema keywords for whole request messages, by full name: rules that relate their fields (never
    `properties` or `required` at the top: they would replace the message's own)."""
    return {
        # A recipient, or the message this one answers (its sender is then the recipient).
        _MSG + "Message": {
            "anyOf": [
                {"required": ["recipient"], "properties": {"recipient": {"type": "object"}}},
                {"required": ["in_reply_to"], "properties": {"in_reply_to": {"type": "string", "minLength": 1}}},
            ]
        },
        # A recipient of this mesh is named by its id (agents of peer meshes are not reachable yet).
        _MSG + "Party": {
            "allOf": [
                {
                    "required": ["agent_id"],
                    "properties": {"agent_id": {"type": "string", "minLength": 1}, "mesh": {"maxLength": 0}},
                }
            ]
        },
    }


def _any_case(word: str) -> str:
    """`host` -> `[Hh][Oo][Ss][Tt]`: ECMA-262 patterns have no inline case-insensitive flag."""
    # Header names are letters, digits and "-", which needs no escape outside a class.
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


def _header_name() -> str:
    """agents.HEADER_NAME without the headers the HTTP client owns (agents.RESERVED_HEADERS, proxy-*)."""
    reserved = "|".join(_any_case(h) for h in sorted(rules.RESERVED_HEADERS))
    return f"^(?:(?!(?:{reserved}){_END}|{_any_case('proxy-')}){_inner(rules.HEADER_NAME)})?{_END}"


# A token URL as agents.validate_auth takes it: https to a host name (a subset: IP literals, which the check
# refuses in part, are left out), or http to 127.0.0.1 or localhost (egress refuses [::1], a reserved range);
# no user info, no fragment.
_TOKEN_URL_TAIL = f"(?::{_PORT})?(?:[/?][^#{SPACES}{rules.CONTROL_CHARS}\\t\\n\\v\\f\\r]*)?"
_TOKEN_URL = (
    f"^(?:https://(?:[A-Za-z0-9-]+\\.)*[A-Za-z][A-Za-z0-9-]*{_TOKEN_URL_TAIL}"
    f"|http://(?:127\\.0\\.0\\.1|localhost){_TOKEN_URL_TAIL})?{_END}"
)


def _auth_constraints() -> dict[tuple[str, str], dict[str, Any]]:
    auth = REGISTRY + "AgentAuth"
    return {
        (auth, "api_key_header"): {"maxLength": 64, "pattern": _header_name()},
        (auth, "api_key"): {"maxLength": rules.MAX_SECRET, "pattern": optional(rules.HEADER_SECRET)},
        (auth, "bearer_token"): {"maxLength": rules.MAX_SECRET, "pattern": optional(rules.HEADER_SECRET)},
        (auth, "client_secret"): {"maxLength": rules.MAX_SECRET, "pattern": optional(rules.VSCHAR)},
        (auth, "client_id"): {"maxLength": rules.MAX_CLIENT_ID, "pattern": optional(rules.VSCHAR)},
        (auth, "token_url"): {"maxLength": rules.MAX_URL, "pattern": _TOKEN_URL},
        (auth, "scopes"): {"maxItems": rules.MAX_AUTH_SCOPES},
        (auth, "scopes[]"): {"pattern": whole(rules.SCOPE_TOKEN)},
        (auth, "audience"): text_schema(rules.MAX_AUDIENCE),
        (auth, "token_endpoint_auth_method"): {"enum": ["", *rules.TOKEN_AUTH_METHODS]},
        (auth, "ca_pem"): {
            "maxLength": rules.MAX_CA_PEM,
            "description": "PEM certificates (-----BEGIN CERTIFICATE-----) that must parse; at most 16 KiB.",
        },
    }


def auth_variants() -> list[dict[str, Any]]:
    """An AgentAuth request by kind (agents.AUTH_KIND_FIELDS): the fields its kind uses, its secret required, the
    others empty. (On an update the server also takes a kind's secret left out when it keeps the stored one.)"""
    variants = []
    for kind in rules.AUTH_KINDS:
        used = rules.AUTH_KIND_FIELDS[kind]
        properties: dict[str, Any] = {
            "kind": {"enum": [kind, "unspecified", None]} if kind == rules.AUTH_NONE else {"const": kind}
        }
        for name in rules.AUTH_FIELDS:
            if name not in used:
                properties[name] = {"maxItems": 0} if name == "scopes" else {"maxLength": 0}
        required = [] if kind == rules.AUTH_NONE else ["kind"]
        secret = rules.AUTH_SECRET_FIELDS.get(kind)
        needed = [secret] if secret else []
        if kind == rules.AUTH_OAUTH2:
            needed += ["token_url", "client_id"]
        for name in needed:
            properties[name] = {"type": "string", "minLength": 1}
            required.append(name)
        variants.append({"properties": properties, "required": required})
    return variants


def endpoint_variants() -> list[dict[str, Any]]:
    """An endpoint's URL scheme depends on its protocol (agents.URL_SCHEMES)."""
    return [
        {"properties": {"protocol": {"const": protocol}, "url": url_schema(schemes, required=True)}}
        for protocol, schemes in rules.URL_SCHEMES.items()
    ]


# An agent as the README registers it: what a client (or a fuzzer) can start from.
AGENT_EXAMPLE = {
    "did": "did:web:example.com:nlp",
    "name": "NLP Agent",
    "version": "1.0.0",
    "agent_type": "nlp",
    "capabilities": [{"kind": "skill", "name": "summarize", "version": "1.4.2"}],
    "endpoints": [{"protocol": "http", "url": "https://example.com/nlp"}],
    "tags": ["nlp"],
    "sharing": "federated",
}
