"""An HTTP request (path variables, query string, JSON body) as the gRPC request message, as grpc-gateway does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import message
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from agentvault_edge.json_in import json_to_message, set_field
from agentvault_edge.transcode import (
    FIELD_MASK,
    STRING_FORM_WKT,
    WELL_KNOWN,
    WRAPPERS,
    FieldError,
    descriptor_of,
    field_index,
    is_map,
    message_type,
)

_T = FieldDescriptor


def resolve_field_path(desc: Descriptor, dotted: str, *, for_query: bool) -> list[FieldDescriptor]:
    """The chain of fields for `a.b.c`; every step but the last must be a singular plain message."""
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = desc
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        fd = field_index(current).get(part) if current is not None else None
        if fd is None:
            raise FieldError(dotted, "unknown field" if for_query else f"no field {here}")
        chain.append(fd)
        last = i == len(parts) - 1
        is_message = fd.type == _T.TYPE_MESSAGE
        if not last:
            if not is_message or fd.is_repeated or message_type(fd).full_name in WELL_KNOWN:
                raise FieldError(dotted, f"{here} has no sub-fields that can be set here")
            current = message_type(fd)
            continue
        if is_map(fd) or (is_message and fd.is_repeated):
            raise FieldError(dotted, "cannot be set from a query parameter or path")
        if is_message and message_type(fd).full_name not in STRING_FORM_WKT | WRAPPERS:
            raise FieldError(dotted, "is a message; set its fields instead, e.g. " + f"{dotted}.<field>")
        if fd.is_repeated and not for_query:
            raise FieldError(dotted, "a path variable cannot bind a repeated field")
    return chain


def text_to_json(fd: FieldDescriptor, raw: str) -> Any:
    """A path or query string as the JSON value `set_field` expects for `fd`."""
    kind = fd.type
    if kind == _T.TYPE_MESSAGE and message_type(fd).full_name in WRAPPERS:
        fd = message_type(fd).fields_by_name["value"]
        kind = fd.type
    if kind == _T.TYPE_BOOL:
        lowered = raw.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
    # Everything else is accepted as text by convert_scalar (integers, floats, enum words, base64).
    return raw


@dataclass(frozen=True)
class HttpRequestParts:
    """What the HTTP request supplied, before it is turned into the gRPC request message."""

    http_method: str
    bindings: Mapping[str, str]
    query: Sequence[tuple[str, str]]
    body: Any


def build_request(request_class: type[message.Message], body_field: str, parts: HttpRequestParts) -> message.Message:
    """The request message: body first, then query parameters, then path variables (the URL wins)."""
    msg = request_class()
    desc = descriptor_of(msg)
    if body_field == "*":
        json_to_message({} if parts.body is None else parts.body, msg)
    elif body_field and parts.body is not None:
        set_field(msg, desc.fields_by_name[body_field], parts.body, body_field)
    path_fields = set(parts.bindings)

    grouped: dict[str, list[str]] = {}
    for key, value in parts.query:
        grouped.setdefault(key, []).append(value)
    query_fields: set[str] = set()
    for key, values in grouped.items():
        if body_field == "*":
            raise FieldError(key, "unknown query parameter: this method takes every field in the JSON body")
        chain = resolve_field_path(desc, key, for_query=True)
        canonical = ".".join(fd.name for fd in chain)
        if body_field and chain[0].name == body_field:
            raise FieldError(canonical, "is set in the JSON body, not in the query string")
        if any(canonical == p or canonical.startswith(p + ".") or p.startswith(canonical + ".") for p in path_fields):
            raise FieldError(canonical, "is set by the URL path, not in the query string")
        if canonical in query_fields:
            raise FieldError(canonical, "given more than once")
        query_fields.add(canonical)
        leaf = chain[-1]
        target = _descend(msg, chain[:-1])
        if leaf.is_repeated:
            set_field(target, leaf, [text_to_json(leaf, v) for v in values], canonical)
        elif len(values) > 1:
            raise FieldError(canonical, "given more than once")
        else:
            set_field(target, leaf, text_to_json(leaf, values[0]), canonical)

    for dotted, raw in parts.bindings.items():
        chain = resolve_field_path(desc, dotted, for_query=False)
        set_field(_descend(msg, chain[:-1]), chain[-1], text_to_json(chain[-1], raw), dotted)

    if parts.http_method == "PATCH" and body_field not in ("", "*"):
        _infer_update_mask(msg, body_field, parts, query_fields)
    return msg


def _descend(msg: message.Message, chain: Sequence[FieldDescriptor]) -> message.Message:
    for fd in chain:
        msg = getattr(msg, fd.name)
    return msg


def _infer_update_mask(msg: message.Message, body_field: str, parts: HttpRequestParts, query_fields: set[str]) -> None:
    """PATCH without ?update_mask changes exactly the body's top-level fields, as grpc-gateway does."""
    mask_fd = descriptor_of(msg).fields_by_name.get("update_mask")
    if mask_fd is None or mask_fd.is_repeated or mask_fd.type != _T.TYPE_MESSAGE:
        return
    if message_type(mask_fd).full_name != FIELD_MASK or "update_mask" in query_fields:
        return
    body_desc = descriptor_of(msg).fields_by_name[body_field].message_type
    body = {} if parts.body is None else parts.body
    if body_desc is None or body_desc.full_name in WELL_KNOWN or not isinstance(body, dict):
        return
    index = field_index(body_desc)
    # Fields the URL binds (agent.id) identify the resource; they are not changes.
    bound = {p.removeprefix(body_field + ".") for p in parts.bindings if p.startswith(body_field + ".")}
    paths = [index[key].name for key in body if index[key].name not in bound]
    if not paths:
        # An empty mask means "replace everything"; a PATCH that names no field must not do that.
        raise FieldError(body_field, "a PATCH body must name at least one field to change")
    msg.update_mask.paths.extend(paths)  # type: ignore[attr-defined]
