"""JSON <-> protobuf for the edge: snake_case names, every field printed, int64 as numbers, enums as words."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import descriptor_pool, json_format, message, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, OneofDescriptor

# Imported for their side effect: the google.rpc detail types must be in the default pool so that
# `Any` details from a backend can be printed field by field.
from google.rpc import error_details_pb2  # noqa: F401

TIMESTAMP = "google.protobuf.Timestamp"
DURATION = "google.protobuf.Duration"
FIELD_MASK = "google.protobuf.FieldMask"
STRUCT = "google.protobuf.Struct"
VALUE = "google.protobuf.Value"
LIST_VALUE = "google.protobuf.ListValue"
ANY = "google.protobuf.Any"
EMPTY = "google.protobuf.Empty"
WRAPPERS = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "DoubleValue",
        "FloatValue",
        "Int64Value",
        "UInt64Value",
        "Int32Value",
        "UInt32Value",
        "BoolValue",
        "StringValue",
        "BytesValue",
    )
)
# Well-known types whose JSON form is a single string, so they can also come from a path or query parameter.
STRING_FORM_WKT = frozenset({TIMESTAMP, DURATION, FIELD_MASK})
JSON_NATIVE_WKT = frozenset({STRUCT, VALUE, LIST_VALUE, ANY})
WELL_KNOWN = STRING_FORM_WKT | JSON_NATIVE_WKT | WRAPPERS | {EMPTY}

_T = FieldDescriptor
INT_RANGES: dict[int, tuple[int, int]] = {
    _T.TYPE_INT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _T.TYPE_UINT32: (0, 2**32 - 1),
    _T.TYPE_FIXED32: (0, 2**32 - 1),
    _T.TYPE_INT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _T.TYPE_UINT64: (0, 2**64 - 1),
    _T.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38
_INT_TEXT = re.compile(r"-?[0-9]{1,25}")
_FLOAT_TEXT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,4})?")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[0-9A-Z])(?=[A-Z][a-z])")


def descriptor_of(msg: message.Message) -> Descriptor:
    # The stubs type DESCRIPTOR as a union with the upb class; both behave as a Descriptor.
    return cast(Descriptor, msg.DESCRIPTOR)


def message_type(fd: FieldDescriptor) -> Descriptor:
    if fd.message_type is None:
        raise TypeError(f"{fd.full_name} is not a message field")
    return fd.message_type


def enum_type(fd: FieldDescriptor) -> EnumDescriptor:
    if fd.enum_type is None:
        raise TypeError(f"{fd.full_name} is not an enum field")
    return fd.enum_type


def oneof_of(fd: FieldDescriptor) -> OneofDescriptor:
    if fd.containing_oneof is None:
        raise TypeError(f"{fd.full_name} is not in a oneof")
    return fd.containing_oneof


class FieldError(ValueError):
    """A request value the edge cannot accept; `field` is its dotted path in the request message."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field
        self.description = description


# ---------------------------------------------------------------------------------------------- enums


def upper_snake(name: str) -> str:
    """CapabilityKind -> CAPABILITY_KIND; HTTPMethod -> HTTP_METHOD."""
    return _CAMEL_BOUNDARY.sub("_", name).upper()


@dataclass(frozen=True)
class EnumWords:
    """An enum's user-facing words: the value name without the UPPER_SNAKE type-name prefix, lowercased."""

    to_word: Mapping[int, str]
    from_text: Mapping[str, int]
    words: tuple[str, ...]


_enum_cache: dict[str, EnumWords] = {}


def enum_words(enum: EnumDescriptor) -> EnumWords:
    cached = _enum_cache.get(enum.full_name)
    if cached is not None:
        return cached
    prefix = upper_snake(enum.name) + "_"
    to_word: dict[int, str] = {}
    from_text: dict[str, int] = {}
    words: list[str] = []
    for value in enum.values:
        name = value.name
        word = (name[len(prefix) :] if name.startswith(prefix) and len(name) > len(prefix) else name).lower()
        # With allow_alias the first name of a number is the canonical one, as in protoc's output.
        to_word.setdefault(value.number, word)
        from_text.setdefault(word, value.number)
        from_text.setdefault(name.lower(), value.number)
        if word not in words:
            words.append(word)
    result = EnumWords(to_word, from_text, tuple(words))
    _enum_cache[enum.full_name] = result
    return result


def enum_to_json(enum: EnumDescriptor, number: int) -> str | int:
    # An open enum can carry a number this build does not know; print it rather than lose it.
    return enum_words(enum).to_word.get(number, number)


def parse_enum(enum: EnumDescriptor, value: Any, where: str) -> int:
    words = enum_words(enum)
    if isinstance(value, str):
        number = words.from_text.get(value.lower())
        if number is not None:
            return number
    raise FieldError(where, f"must be one of {', '.join(words.words)}; got {_show(value)}")


# ------------------------------------------------------------------------------------- proto -> JSON


def is_map(fd: FieldDescriptor) -> bool:
    return fd.type == _T.TYPE_MESSAGE and fd.is_repeated and message_type(fd).GetOptions().map_entry


def message_to_json(msg: message.Message) -> dict[str, Any]:
    """Every field, named as in the proto; unset message fields and unset optionals are null."""
    out: dict[str, Any] = {}
    for fd in descriptor_of(msg).fields:
        out[fd.name] = field_to_json(msg, fd)
    return out


def field_to_json(msg: message.Message, fd: FieldDescriptor) -> Any:
    value = getattr(msg, fd.name)
    if is_map(fd):
        key_fd = message_type(fd).fields_by_name["key"]
        value_fd = message_type(fd).fields_by_name["value"]
        return {_map_key_to_json(key_fd, k): _value_to_json(value_fd, value[k]) for k in sorted(value)}
    if fd.is_repeated:
        return [_value_to_json(fd, item) for item in value]
    if fd.has_presence and not msg.HasField(fd.name):
        return None
    return _value_to_json(fd, value)


def _map_key_to_json(fd: FieldDescriptor, key: Any) -> str:
    if fd.type == _T.TYPE_BOOL:
        return "true" if key else "false"
    return str(key)


def _value_to_json(fd: FieldDescriptor, value: Any) -> Any:
    kind = fd.type
    if kind in (_T.TYPE_MESSAGE, _T.TYPE_GROUP):
        return message_value_to_json(value)
    if kind == _T.TYPE_ENUM:
        return enum_to_json(enum_type(fd), value)
    if kind == _T.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if kind in (_T.TYPE_FLOAT, _T.TYPE_DOUBLE):
        return _float_to_json(value, single=kind == _T.TYPE_FLOAT)
    # Integers of every width are printed as JSON numbers: the product's clients expect numbers, not the
    # proto3 JSON strings for 64-bit values.
    return value


def _float_to_json(value: float, *, single: bool) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if single:
        # A float32 widened to double prints as 0.10000000149011612; print the shortest text that reads
        # back as the same float32 instead.
        for precision in range(6, 10):
            short = float(f"{value:.{precision}g}")
            if struct.unpack("<f", struct.pack("<f", short))[0] == value:
                return short
    return value


def message_value_to_json(msg: message.Message) -> Any:
    """A message's JSON, with the well-known types in their special forms."""
    name = descriptor_of(msg).full_name
    if name in (TIMESTAMP, DURATION):
        try:
            return msg.ToJsonString()  # type: ignore[attr-defined]
        except ValueError:
            return None
    if name == FIELD_MASK:
        return ",".join(msg.paths)  # type: ignore[attr-defined]
    if name in WRAPPERS:
        return _value_to_json(descriptor_of(msg).fields_by_name["value"], getattr(msg, "value"))  # noqa: B009
    if name in (STRUCT, VALUE, LIST_VALUE):
        return json_format.MessageToDict(msg)
    if name == ANY:
        return any_to_json(msg)
    return message_to_json(msg)


def any_to_json(packed: Any) -> dict[str, Any]:
    """`{"@type": url, ...fields}`, or `{"@type": url, "value": base64}` when the type is not known here."""
    url: str = packed.type_url
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(url.rpartition("/")[2])
        inner = message_factory.GetMessageClass(desc)()
        if not packed.Unpack(inner):
            raise KeyError(url)
    except (KeyError, TypeError, message.DecodeError):
        return {"@type": url, "value": base64.b64encode(packed.value).decode("ascii")}
    if desc.full_name in WELL_KNOWN and desc.full_name != EMPTY:
        return {"@type": url, "value": message_value_to_json(inner)}
    return {"@type": url, **message_to_json(inner)}


def response_to_json(msg: message.Message, response_body: str = "") -> Any:
    """The HTTP response body: the whole message, or only the field named by `response_body`."""
    if response_body:
        return field_to_json(msg, descriptor_of(msg).fields_by_name[response_body])
    return message_value_to_json(msg)


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


# ------------------------------------------------------------------------------------- JSON -> proto


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


_index_cache: dict[str, dict[str, FieldDescriptor]] = {}


def field_index(desc: Descriptor) -> dict[str, FieldDescriptor]:
    """Fields by proto name and by lowerCamel JSON name, both accepted on input as protojson does."""
    index = _index_cache.get(desc.full_name)
    if index is None:
        index = {}
        for fd in desc.fields:
            index[fd.json_name] = fd
        for fd in desc.fields:
            index[fd.name] = fd
        _index_cache[desc.full_name] = index
    return index


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
    for key, value in data.items():
        fd = index.get(key)
        if fd is None:
            raise FieldError(_join(path, key), "unknown field")
        if fd.name in seen:
            raise FieldError(_join(path, fd.name), f"given twice (as {seen[fd.name]} and {key})")
        seen[fd.name] = key
        if value is not None and _is_real_oneof(fd):
            oneof = oneof_of(fd).name
            if oneof in chosen:
                raise FieldError(_join(path, fd.name), f"only one of {oneof} may be set; {chosen[oneof]} is set")
            chosen[oneof] = fd.name
        set_field(msg, fd, value, _join(path, fd.name))


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


# --------------------------------------------------------------------------------- HTTP -> request


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
