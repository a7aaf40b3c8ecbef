"""JSON -> protobuf for the edge: fields by snake_case or lowerCamel name, every wrong value named by its path."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from google.protobuf import json_format, message
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor

from agentvault.common.enums import enum_words
from agentvault_edge.transcode import (
    DURATION,
    EMPTY,
    FIELD_MASK,
    INT_RANGES,
    JSON_NATIVE_WKT,
    TIMESTAMP,
    VALUE,
    WRAPPERS,
    FieldError,
    descriptor_of,
    enum_type,
    field_index,
    is_map,
    message_type,
    oneof_of,
)

_T = FieldDescriptor
_FLOAT32_MAX = 3.4028234663852886e38
_INT_TEXT = re.compile(r"-?[0-9]{1,25}")
_FLOAT_TEXT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,4})?")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# lowerCamel -> snake_case for field paths (agentType -> agent_type).
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[0-9A-Z])(?=[A-Z][a-z])")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_real_oneof(fd: FieldDescriptor) -> bool:
    oneof = fd.containing_oneof
    if oneof is None:
        return False
    # proto3 `optional` is a synthetic oneof of one field named `_<field>`; it is not a choice.
    return not (len(oneof.fields) == 1 and oneof.name == f"_{fd.name}")


def json_to_message(data: Any, msg: message.Message, path: str = "") -> None:
    """Fills `msg` from a JSON object, rejecting unknown fields and values of the wrong type by path."""
    if not isinstance(data, dict):
        raise FieldError(path, f"must be a JSON object, got {_json_type(data)}")
    index = field_index(descriptor_of(msg))
    seen: dict[str, str] = {}
    chosen: dict[str, str] = {}
    # A null clears a field. For a google.protobuf.Value member of a oneof it is the JSON null only when nothing
    # else of that oneof is given: JSON writers emit nulls for what they leave unset, and the answer must not
    # depend on the keys' order.
    null_values: list[FieldDescriptor] = []
    for key, value in data.items():
        fd = index.get(key)
        if fd is None:
            raise FieldError(_join(path, key), "unknown field")
        if fd.name in seen:
            raise FieldError(_join(path, fd.name), f"given twice (as {seen[fd.name]} and {key})")
        seen[fd.name] = key
        if not _is_real_oneof(fd):
            set_field(msg, fd, value, _join(path, fd.name))
        elif value is None:
            if _is_value(fd):
                null_values.append(fd)
        else:
            oneof = oneof_of(fd).name
            if oneof in chosen:
                raise FieldError(_join(path, fd.name), f"only one of {oneof} may be set; {chosen[oneof]} is set")
            chosen[oneof] = fd.name
            set_field(msg, fd, value, _join(path, fd.name))
    for fd in null_values:
        oneof = oneof_of(fd).name
        if oneof not in chosen:
            chosen[oneof] = fd.name
            set_field(msg, fd, None, _join(path, fd.name))


def _is_value(fd: FieldDescriptor) -> bool:
    return fd.type == _T.TYPE_MESSAGE and not fd.is_repeated and message_type(fd).full_name == VALUE


def set_field(msg: message.Message, fd: FieldDescriptor, value: Any, where: str) -> None:
    """Sets one field from its JSON value (null clears it); `where` names it in errors."""
    try:
        _set_field(msg, fd, value, where)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, FieldError):
            raise
        # The runtime's own checks, e.g. a string with a lone surrogate that is not valid UTF-8.
        raise FieldError(where, f"invalid value: {exc}") from None


def _set_field(msg: message.Message, fd: FieldDescriptor, value: Any, where: str) -> None:
    is_value_type = fd.type == _T.TYPE_MESSAGE and message_type(fd).full_name == VALUE
    if value is None:
        if is_value_type and not fd.is_repeated:
            getattr(msg, fd.name).null_value = 0
        else:
            msg.ClearField(fd.name)
        return
    if is_map(fd):
        if not isinstance(value, dict):
            raise FieldError(where, f"must be a JSON object, got {_json_type(value)}")
        key_fd = message_type(fd).fields_by_name["key"]
        value_fd = message_type(fd).fields_by_name["value"]
        container = getattr(msg, fd.name)
        for raw_key, item in value.items():
            item_where = f"{where}[{raw_key}]"
            key = _map_key(key_fd, raw_key, item_where)
            if value_fd.type == _T.TYPE_MESSAGE:
                if item is None and message_type(value_fd).full_name != VALUE:
                    raise FieldError(item_where, "must not be null")
                fill_message_value(container[key], item, item_where)
            else:
                if item is None:
                    raise FieldError(item_where, "must not be null")
                container[key] = convert_scalar(value_fd, item, item_where)
        return
    if fd.is_repeated:
        if not isinstance(value, list):
            raise FieldError(where, f"must be a JSON array, got {_json_type(value)}")
        container = getattr(msg, fd.name)
        for i, item in enumerate(value):
            item_where = f"{where}[{i}]"
            if item is None and not is_value_type:
                raise FieldError(item_where, "must not be null")
            if fd.type == _T.TYPE_MESSAGE:
                fill_message_value(container.add(), item, item_where)
            else:
                container.append(convert_scalar(fd, item, item_where))
        return
    if fd.type == _T.TYPE_MESSAGE:
        sub = getattr(msg, fd.name)
        sub.SetInParent()
        fill_message_value(sub, value, where)
        return
    setattr(msg, fd.name, convert_scalar(fd, value, where))


def _map_key(fd: FieldDescriptor, key: str, where: str) -> Any:
    if fd.type == _T.TYPE_BOOL:
        if key in ("true", "false"):
            return key == "true"
        raise FieldError(where, "map key must be true or false")
    if fd.type == _T.TYPE_STRING:
        return key
    return convert_scalar(fd, key, where)


def fill_message_value(sub: message.Message, value: Any, where: str) -> None:
    """Fills a message from its JSON, including the special forms of the well-known types."""
    name = descriptor_of(sub).full_name
    if name in (TIMESTAMP, DURATION):
        example = "an RFC 3339 timestamp such as 2024-01-31T12:00:00Z" if name == TIMESTAMP else "a duration like 1.5s"
        if not isinstance(value, str):
            raise FieldError(where, f"must be {example}, got {_json_type(value)}")
        try:
            sub.FromJsonString(value)  # type: ignore[attr-defined]
        except ValueError:
            raise FieldError(where, f"must be {example}; got {_show(value)}") from None
    elif name == FIELD_MASK:
        if not isinstance(value, str):
            raise FieldError(where, f"must be a comma-separated list of field paths, got {_json_type(value)}")
        sub.paths.extend(parse_field_mask(value, where))  # type: ignore[attr-defined]
    elif name in WRAPPERS:
        inner = descriptor_of(sub).fields_by_name["value"]
        sub.value = convert_scalar(inner, value, where)  # type: ignore[attr-defined]
    elif name in JSON_NATIVE_WKT:
        try:
            json_format.ParseDict(value, sub)
        except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise FieldError(where, str(exc) or "invalid value") from None
    elif name == EMPTY:
        if value != {}:
            raise FieldError(where, "must be an empty JSON object")
    else:
        json_to_message(value, sub, where)


def parse_field_mask(text: str, where: str) -> list[str]:
    """Comma-separated paths; snake_case as in the proto, or the lowerCamel form of proto3 JSON."""
    paths = []
    for raw in text.split(","):
        path = raw.strip()
        if not path:
            continue
        parts = path.split(".")
        if not all(_IDENT.fullmatch(part) for part in parts):
            raise FieldError(where, f"invalid field path {_show(path)}")
        paths.append(".".join(p if "_" in p else _CAMEL_BOUNDARY.sub("_", p).lower() for p in parts))
    return paths


def parse_enum(enum: EnumDescriptor, value: Any, where: str) -> int:
    """A word ("federated") or value name ("SHARING_FEDERATED") in any case; numbers are refused on the wire."""
    words = enum_words(enum)
    if isinstance(value, str):
        number = words.from_text.get(value.lower())
        if number is not None:
            return number
    raise FieldError(where, f"must be one of {words.choices()}; got {_show(value)}")


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    return None


def convert_scalar(fd: FieldDescriptor, value: Any, where: str) -> Any:
    """A JSON value checked and converted for a scalar or enum field."""
    kind = fd.type
    if kind == _T.TYPE_STRING:
        if isinstance(value, str):
            return value
        raise FieldError(where, f"must be a string, got {_json_type(value)}")
    if kind == _T.TYPE_BOOL:
        if isinstance(value, bool):
            return value
        raise FieldError(where, f"must be true or false, got {_json_type(value)}")
    if kind == _T.TYPE_ENUM:
        return parse_enum(enum_type(fd), value, where)
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        number = _to_int(value)
        if number is None or not low <= number <= high:
            raise FieldError(where, f"must be an integer from {low} to {high}; got {_show(value)}")
        return number
    if kind in (_T.TYPE_FLOAT, _T.TYPE_DOUBLE):
        return _to_float(kind, value, where)
    if kind == _T.TYPE_BYTES:
        if isinstance(value, str):
            # Standard or URL-safe alphabet, padding optional: clients produce all of these.
            text = value.translate(_URLSAFE_TO_STANDARD) + "=" * (-len(value) % 4)
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                pass
        raise FieldError(where, "must be base64 text")
    raise FieldError(where, "cannot be set from JSON")


def _to_float(kind: int, value: Any, where: str) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = None
    elif isinstance(value, str):
        special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if value in special:
            number = special[value]
        elif _FLOAT_TEXT.fullmatch(value):
            number = float(value)
    if number is None:
        raise FieldError(where, f"must be a number; got {_show(value)}")
    if kind == _T.TYPE_FLOAT and math.isfinite(number) and abs(number) > _FLOAT32_MAX:
        raise FieldError(where, f"is out of range for a 32-bit float; got {_show(value)}")
    return number
