"""The mesh's messages and A2A 1.0's, mapped both ways without loss, and an A2A agent's answer as bounded replies."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format, struct_pb2

from agentvault.messaging.v1 import messaging_service_pb2 as mpb

# The key of an A2A message's metadata that carries the mesh's own fields, those A2A has no place for.
NAMESPACE = "agentvault"
# The mesh fields that travel under NAMESPACE (the rest map to A2A fields; status fields are the mesh's
# bookkeeping of one delivery and do not travel).
MESH_FIELDS = (
    "format_version",
    "sender",
    "recipient",
    "correlation_id",
    "in_reply_to",
    "headers",
    "expire_time",
    "idempotency_key",
)
# A sender's own metadata under NAMESPACE is kept here inside ours, so that the round trip restores it too.
_OWN = "metadata"

# What one agent's answer may add to the mesh: the agent is an outsider, its answer becomes stored messages.
MAX_REPLIES = 16
MAX_REPLY_PARTS = 64  # the mesh's limit on one message's parts
MAX_REPLY_BYTES = 1024 * 1024  # all replies of one answer together, serialized
MAX_REASON = 256  # the part of an agent's text shown as a status reason
MAX_NAME = 255  # a part's filename and media type
MAX_URL = 2048
MAX_LIST = 16
MAX_LIST_ITEM = 256
_ID_TEXT = re.compile(r"[\x21-\x7e]{1,128}")

# Message statuses (as the mesh's Message.status spells them) for A2A task states: a task that is running or
# waits for more input was taken by the agent; a completed one was handled; failed, rejected and canceled end it.
DELIVERED = "delivered"
ACKNOWLEDGED = "acknowledged"
FAILED = "failed"
STATUS_OF_STATE: dict[int, str] = {
    a2a.TASK_STATE_SUBMITTED: DELIVERED,
    a2a.TASK_STATE_WORKING: DELIVERED,
    a2a.TASK_STATE_INPUT_REQUIRED: DELIVERED,
    a2a.TASK_STATE_AUTH_REQUIRED: DELIVERED,
    a2a.TASK_STATE_COMPLETED: ACKNOWLEDGED,
    a2a.TASK_STATE_FAILED: FAILED,
    a2a.TASK_STATE_REJECTED: FAILED,
    a2a.TASK_STATE_CANCELED: FAILED,
}
# States after which the agent does nothing more without a new message: waiting for them is over.
FINAL_STATES = frozenset(
    {
        a2a.TASK_STATE_COMPLETED,
        a2a.TASK_STATE_FAILED,
        a2a.TASK_STATE_REJECTED,
        a2a.TASK_STATE_CANCELED,
        a2a.TASK_STATE_INPUT_REQUIRED,
        a2a.TASK_STATE_AUTH_REQUIRED,
    }
)

_ROLE_TO_A2A = {"user": a2a.ROLE_USER, "agent": a2a.ROLE_AGENT}
_ROLE_TO_MESH = {a2a.ROLE_USER: "user", a2a.ROLE_AGENT: "agent"}


def part_to_a2a(part: mpb.Part) -> a2a.Part:
    return _copy_part(part, a2a.Part(filename=part.filename, media_type=part.media_type))


def part_to_mesh(part: a2a.Part) -> mpb.Part:
    return _copy_part(part, mpb.Part(filename=part.filename, media_type=part.media_type))


P = TypeVar("P", a2a.Part, mpb.Part)


def _copy_part(part: a2a.Part | mpb.Part, out: P) -> P:
    """The content (text, raw, url or data) and metadata of a part, into the other side's Part: the two have the
    same fields, by design of the mesh's format."""
    kind = part.WhichOneof("content")
    if kind == "text":
        out.text = part.text
    elif kind == "raw":
        out.raw = part.raw
    elif kind == "url":
        out.url = part.url
    elif kind == "data":
        out.data.CopyFrom(part.data)
    if part.HasField("metadata"):
        out.metadata.CopyFrom(part.metadata)
    return out


def to_a2a(message: mpb.Message) -> a2a.Message:
    """The A2A form of a mesh message: A2A's fields field for field, the mesh's own under metadata[NAMESPACE]."""
    out = a2a.Message(
        message_id=message.id,
        context_id=message.conversation_id,
        task_id=message.task_id,
        role=_ROLE_TO_A2A.get(message.role, a2a.ROLE_UNSPECIFIED),
        parts=[part_to_a2a(p) for p in message.parts],
        extensions=list(message.extensions),
        reference_task_ids=list(message.reference_task_ids),
    )
    if message.HasField("metadata"):
        out.metadata.CopyFrom(message.metadata)
    own = mpb.Message()
    for name in MESH_FIELDS:
        _copy_field(message, own, name)
    namespace: dict[str, object] = json_format.MessageToDict(own, preserving_proto_field_name=True)
    if NAMESPACE in message.metadata.fields:
        namespace[_OWN] = json_format.MessageToDict(message.metadata.fields[NAMESPACE])
    if namespace:
        out.metadata.fields[NAMESPACE].CopyFrom(_value(namespace))
    return out


def to_mesh(message: a2a.Message) -> mpb.Message:
    """The mesh form of an A2A message, with the mesh's fields restored from metadata[NAMESPACE]. Those fields
    (the sender above all) are whatever the A2A side wrote: a caller that takes messages from outsiders uses
    `content_of` instead, or overwrites them."""
    out = content_of(message)
    namespace = message.metadata.fields.get(NAMESPACE)
    if namespace is None or namespace.WhichOneof("kind") != "struct_value":
        return out
    own = namespace.struct_value.fields.get(_OWN)
    fields = json_format.MessageToDict(namespace.struct_value)
    fields.pop(_OWN, None)
    restored = mpb.Message()
    try:
        json_format.ParseDict(fields, restored, ignore_unknown_fields=True)
    except json_format.ParseError:
        restored = mpb.Message()  # not ours after all: the A2A side's own metadata, kept as it is below
        own = None
    else:
        out.metadata.fields.pop(NAMESPACE, None)
    for name in MESH_FIELDS:
        _copy_field(restored, out, name)
    if own is not None:
        out.metadata.fields[NAMESPACE].CopyFrom(own)
    if out.HasField("metadata") and not out.metadata.fields:
        out.ClearField("metadata")
    return out


def content_of(message: a2a.Message) -> mpb.Message:
    """An A2A message's own fields in mesh form, nothing taken from metadata[NAMESPACE] (left in metadata)."""
    out = mpb.Message(
        id=message.message_id,
        conversation_id=message.context_id,
        task_id=message.task_id,
        role=_ROLE_TO_MESH.get(message.role, ""),
        parts=[part_to_mesh(p) for p in message.parts],
        extensions=list(message.extensions),
        reference_task_ids=list(message.reference_task_ids),
    )
    if message.HasField("metadata"):
        out.metadata.CopyFrom(message.metadata)
    return out


@dataclass
class Replies:
    """An agent's answer as mesh replies, within the bounds above; `dropped` counts what did not fit."""

    messages: list[mpb.Message] = field(default_factory=list)
    dropped: int = 0
    size: int = 0


def status_of(task: a2a.Task) -> str:
    """The mesh status of a message whose delivery made this task (delivered for a state it does not know)."""
    return STATUS_OF_STATE.get(task.status.state, DELIVERED)


def reason_of(task: a2a.Task) -> str:
    """The task's state, and the start of its status message's text: the status reason shown to the sender."""
    state = a2a.TaskState.Name(task.status.state).removeprefix("TASK_STATE_").lower()
    text = " ".join(p.text for p in task.status.message.parts if p.WhichOneof("content") == "text").strip()
    return f"A2A task {state}" + (f": {text[:MAX_REASON]}" if text else "")


def answer_replies(original: mpb.Message, answer: a2a.Message | a2a.Task) -> Replies:
    """What an agent answered to `original`, as replies from it: a Message is one reply; a task's status message
    is one (the answer of a completed task, why it failed, the question of one waiting for input) and each
    artifact of a completed task is one more, in order, so the artifacts' boundaries and names survive (the name,
    id and description in the reply's metadata[NAMESPACE]["artifact"]). Every reply has the original's
    conversation and correlation, answers it (in_reply_to) and has role agent; nothing the agent wrote under
    metadata[NAMESPACE] is believed. At most MAX_REPLIES replies of MAX_REPLY_PARTS parts and MAX_REPLY_BYTES
    in all; the rest is counted in `dropped`."""
    out = Replies()
    if isinstance(answer, a2a.Message):
        _add(out, original, answer.parts, answer, {})
        return out
    if answer.status.HasField("message") and answer.status.message.parts:
        _add(out, original, answer.status.message.parts, answer.status.message, {}, task_id=answer.id)
    if answer.status.state == a2a.TASK_STATE_COMPLETED:
        for artifact in answer.artifacts:
            about = {"id": artifact.artifact_id, "name": artifact.name, "description": artifact.description}
            info = {"artifact": {k: v[:MAX_LIST_ITEM] for k, v in about.items() if v}}
            _add(out, original, artifact.parts, artifact, info, task_id=answer.id)
    return out


def _add(
    out: Replies,
    original: mpb.Message,
    parts: object,
    source: a2a.Message | a2a.Artifact,
    info: Mapping[str, Any],
    *,
    task_id: str = "",
) -> None:
    if len(out.messages) >= MAX_REPLIES:
        out.dropped += 1
        return
    reply = mpb.Message(
        conversation_id=original.conversation_id,
        correlation_id=original.correlation_id or original.id,
        in_reply_to=original.id,
        role="agent",
    )
    kept = [part_to_mesh(p) for p in parts if _acceptable(p)]  # type: ignore[attr-defined]
    reply.parts.extend(kept[:MAX_REPLY_PARTS])
    if not reply.parts:
        out.dropped += 1
        return
    if isinstance(source, a2a.Message):
        task_id = source.task_id or task_id
        if source.message_id[:MAX_LIST_ITEM]:
            info = {**info, "message_id": source.message_id[:MAX_LIST_ITEM]}
        reply.reference_task_ids.extend(i for i in source.reference_task_ids[:MAX_LIST] if 0 < len(i) <= MAX_LIST_ITEM)
    reply.extensions.extend(e for e in source.extensions[:MAX_LIST] if 0 < len(e) <= MAX_LIST_ITEM)
    if _ID_TEXT.fullmatch(task_id):
        reply.task_id = task_id
    if source.HasField("metadata"):
        reply.metadata.CopyFrom(source.metadata)
        reply.metadata.fields.pop(NAMESPACE, None)
    if info:
        reply.metadata.fields[NAMESPACE].CopyFrom(_value(info))
    size = reply.ByteSize()
    if out.size + size > MAX_REPLY_BYTES:
        out.dropped += 1
        return
    out.size += size
    out.messages.append(reply)


def _acceptable(part: a2a.Part) -> bool:
    """A part the mesh stores as it is: some content, a URL it accepts (http or https, bounded), bounded names."""
    kind = part.WhichOneof("content")
    if kind is None or len(part.filename) > MAX_NAME or len(part.media_type) > MAX_NAME:
        return False
    return kind != "url" or (len(part.url) <= MAX_URL and part.url.lower().startswith(("http://", "https://")))


def _copy_field(source: mpb.Message, target: mpb.Message, name: str) -> None:
    if name == "headers":  # the one map among MESH_FIELDS
        target.headers.update(source.headers)
    elif mpb.Message.DESCRIPTOR.fields_by_name[name].message_type is not None:
        if cast(Any, source).HasField(name):
            getattr(target, name).CopyFrom(getattr(source, name))
    else:
        setattr(target, name, getattr(source, name))


def _value(data: Mapping[str, Any]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update(data)
    return value
