"""The message format's rules: every field validated and size-bounded, the stored form, and the request's hash."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime

from google.protobuf import json_format

from agentvault.common import agents as rules
from agentvault.common.errors import InvalidArgument, ResourceExhausted
from agentvault.messaging.v1 import messaging_service_pb2 as mpb

FORMAT_VERSION = "1"
FORMAT_VERSIONS = frozenset({FORMAT_VERSION})
MAX_PARTS = 64
MAX_HEADERS = 32
MAX_HEADER_VALUE = 1024
MAX_ID = 128
MAX_LIST = 16
MAX_LIST_ITEM = 256
MAX_NAME = 255
MAX_URL = rules.MAX_URL
MAX_DID = 512
MAX_MESH = 255
# The whole message, serialized; the default of MESSAGING_MAX_MESSAGE_BYTES.
DEFAULT_MAX_BYTES = 1024 * 1024
MAX_EXPIRY_SECONDS = 30 * 86400
ROLES = ("", "user", "agent")
STATUSES = ("held", "accepted", "delivered", "acknowledged", "failed", "dead_lettered", "expired", "refused")
# Statuses a message does not leave (except a dead letter, by replay).
FINAL = frozenset({"acknowledged", "failed", "dead_lettered", "expired", "refused"})

_HEADER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_ID_TEXT = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces: ids pass through URLs and headers

# The fields a sender writes; the rest are the mesh's (sender, status...).
CONTENT_FIELDS = (
    "id",
    "format_version",
    "recipient",
    "conversation_id",
    "correlation_id",
    "in_reply_to",
    "parts",
    "headers",
    "expire_time",
    "idempotency_key",
    "metadata",
    "task_id",
    "role",
    "extensions",
    "reference_task_ids",
    "streaming",
)

_MESH_FIELDS = tuple(f.name for f in mpb.Message.DESCRIPTOR.fields if f.name not in CONTENT_FIELDS)


def content(message: mpb.Message) -> mpb.Message:
    """Only the fields a sender writes, as stored; the mesh's own come from the row."""
    out = mpb.Message()
    out.CopyFrom(message)  # one copy in C, then the mesh's own fields cleared: cheaper than field by field
    for name in _MESH_FIELDS:
        out.ClearField(name)  # type: ignore[arg-type]
    out.DiscardUnknownFields()
    if out.HasField("recipient"):  # (reading out.recipient alone would not add one; clearing its fields would)
        out.recipient.ClearField("kind")
        out.recipient.ClearField("principal_id")
    return out


def request_hash(message: mpb.Message) -> bytes:
    """What makes two sends the same send: their content, deterministically serialized."""
    return stored(message)[1]


def stored(message: mpb.Message) -> tuple[bytes, bytes]:
    """The stored form of a message to send and its request hash, from one copy of its content (a send's hot
    path: the copy is most of the cost)."""
    kept = content(message)
    return kept.SerializeToString(), hashlib.sha256(kept.SerializeToString(deterministic=True)).digest()


def _check_id(v: rules.Violations, path: str, value: str) -> None:
    if value and not _ID_TEXT.fullmatch(value):
        v.add(path, "must be 1-128 printable ASCII characters without spaces")


def _check_uuid(v: rules.Violations, path: str, value: str) -> None:
    if value:
        try:
            uuid.UUID(value)
        except ValueError:
            v.add(path, "must be a UUID")


def check_part(v: rules.Violations, path: str, part: mpb.Part) -> None:
    kind = part.WhichOneof("content")
    if kind is None:
        v.add(path, "must have one of text, raw, url or data")
    elif kind == "url":
        rules.check_url(v, f"{path}.url", part.url, ("http", "https"), required=True)
    rules.check_text(v, f"{path}.filename", part.filename, max_len=MAX_NAME)
    rules.check_text(v, f"{path}.media_type", part.media_type, max_len=MAX_NAME)


def check_recipient(v: rules.Violations, path: str, party: mpb.Party) -> None:
    _check_uuid(v, f"{path}.agent_id", party.agent_id)
    rules.check_text(v, f"{path}.did", party.did, max_len=MAX_DID)
    rules.check_text(v, f"{path}.mesh", party.mesh, max_len=MAX_MESH)
    if not party.agent_id and not party.did:
        v.add(path, "must name the agent: agent_id or did")
    if party.mesh and not party.did:
        v.add(f"{path}.did", "is required for an agent of a peer mesh")


def check(message: mpb.Message, max_bytes: int, *, path: str = "message", now: datetime | None = None) -> None:
    """Every problem of a message to send at once (InvalidArgument with field violations); ResourceExhausted
    (MESSAGE_TOO_LARGE, HTTP 413) when it is larger than `max_bytes` serialized."""
    size = message.ByteSize()
    if size > max_bytes:
        raise ResourceExhausted(
            f"the message is {size} bytes; at most {max_bytes} are accepted (MESSAGING_MAX_MESSAGE_BYTES)",
            "MESSAGE_TOO_LARGE",
            size=str(size),
            limit=str(max_bytes),
        )
    v = rules.Violations()
    _check_uuid(v, f"{path}.id", message.id)
    if message.format_version and message.format_version not in FORMAT_VERSIONS:
        v.add(
            f"{path}.format_version", f"must be one of {sorted(FORMAT_VERSIONS)} (got {message.format_version[:16]!r})"
        )
    if message.HasField("recipient"):
        check_recipient(v, f"{path}.recipient", message.recipient)
    elif not message.in_reply_to:
        v.add(f"{path}.recipient", "is required (unless in_reply_to names the message this answers)")
    _check_id(v, f"{path}.conversation_id", message.conversation_id)
    _check_id(v, f"{path}.correlation_id", message.correlation_id)
    _check_uuid(v, f"{path}.in_reply_to", message.in_reply_to)
    _check_id(v, f"{path}.idempotency_key", message.idempotency_key)
    _check_id(v, f"{path}.task_id", message.task_id)
    if not message.parts and not message.streaming:  # an open message's parts may all come later
        v.add(f"{path}.parts", "must have at least one part (or the message be sent streaming)")
    elif len(message.parts) > MAX_PARTS:
        v.add(f"{path}.parts", f"must have at most {MAX_PARTS} parts (got {len(message.parts)})")
    else:
        for i, part in enumerate(message.parts):
            check_part(v, f"{path}.parts[{i}]", part)
    if len(message.headers) > MAX_HEADERS:
        v.add(f"{path}.headers", f"must have at most {MAX_HEADERS} entries (got {len(message.headers)})")
    else:
        for name, value in message.headers.items():
            if not _HEADER_NAME.fullmatch(name):
                v.add(f"{path}.headers", f"name {name[:40]!r} must be 1-128 of A-Z a-z 0-9 . _ -")
            else:
                rules.check_text(v, f"{path}.headers[{name}]", value, max_len=MAX_HEADER_VALUE)
    if message.HasField("expire_time"):
        expire = message.expire_time.ToDatetime(UTC)
        now = now or datetime.now(UTC)
        if expire <= now:
            v.add(f"{path}.expire_time", "must be in the future")
        elif (expire - now).total_seconds() > MAX_EXPIRY_SECONDS:
            v.add(f"{path}.expire_time", f"must be at most {MAX_EXPIRY_SECONDS // 86400} days ahead")
    if message.role not in ROLES:
        v.add(f"{path}.role", "must be user or agent")
    for name in ("extensions", "reference_task_ids"):
        items = getattr(message, name)
        if len(items) > MAX_LIST:
            v.add(f"{path}.{name}", f"must have at most {MAX_LIST} items")
        for i, item in enumerate(items[:MAX_LIST]):
            rules.check_text(v, f"{path}.{name}[{i}]", item, max_len=MAX_LIST_ITEM, required=True)
    v.raise_if_any()


def require_uuid(path: str, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument([rules.FieldViolation(path, "must be a UUID")]) from None


def json_schema() -> dict[str, object]:
    """The JSON Schema (draft 2020-12) of a message as sent, from the message descriptor (one source of truth)."""
    from agentvault_messaging.schema import message_schema

    return message_schema()


def to_json(message: mpb.Message) -> dict[str, object]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
