"""Protobuf -> JSON for the edge: snake_case names, every field printed, int64 as numbers, enums as words."""

from __future__ import annotations

import base64
import json
import math
import operator
import struct
from collections.abc import Callable
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import descriptor_pool, json_format, message, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor

# Imported for their side effect: the google.rpc detail types must be in the default pool so that
# `Any` details from a backend can be printed field by field.
from google.rpc import error_details_pb2  # noqa: F401

from agentvault.common.enums import enum_words
from agentvault_edge.transcode import (
    ANY,
    DURATION,
    EMPTY,
    FIELD_MASK,
    LIST_VALUE,
    STRUCT,
    TIMESTAMP,
    VALUE,
    WELL_KNOWN,
    WRAPPERS,
    descriptor_of,
    enum_type,
    is_map,
    message_type,
)

_T = FieldDescriptor
_Convert = Callable[[Any], Any]
# Types printed as they come from the runtime: str, bool and integers of every width. Integers are JSON numbers,
# not the proto3 JSON strings for 64-bit values: the product's clients expect numbers.
_AS_IS = frozenset(
    {
        _T.TYPE_STRING,
        _T.TYPE_BOOL,
        *(_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32, _T.TYPE_UINT32, _T.TYPE_FIXED32),
        *(_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64, _T.TYPE_UINT64, _T.TYPE_FIXED64),
    }
)
# One JSONEncoder for every response: json.dumps with options would build a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


# ------------------------------------------------------------------------------------- encoders
# A response of 10 agents has some 200 fields; looking up each one's descriptor, type and presence per request
# was most of the edge's CPU. Instead each message type gets, once, a function made for it: one C call
# (attrgetter) reads every field, and a single dict display builds the output, with a conversion only where a
# field needs one (enum words, repeated and message fields, presence). For Agent it reads:
#     def encode(msg):
#         v = read(msg)
#         return {'id': v[0], ..., 'capabilities': [c6(x) for x in v[6]], 'tags': list(v[8]), ...,
#                 'sharing': c10(v[10], v[10]), ..., 'create_time': (c13(v[13]) if msg.HasField('create_time') ...}
# The source is built only from positions, slot names of ours and repr() of field names (proto identifiers).


class _Encoder:
    """One message type's encoder; `encode` is replaced by the compiled function once it is built."""

    __slots__ = ("encode", "ready")

    def __init__(self) -> None:
        self.ready = False
        self.encode: Callable[[Any], dict[str, Any]] = self._unready

    def _unready(self, msg: Any) -> dict[str, Any]:
        raise RuntimeError(f"the encoder for {type(msg).__name__} is not built yet")


_encoders: dict[str, _Encoder] = {}
_message_converters: dict[str, _Convert] = {}
_field_converters: dict[str, _Convert] = {}


def _encoder_of(desc: Descriptor) -> _Encoder:
    encoder = _encoders.get(desc.full_name)
    if encoder is None:
        # Cached before it is built, so that a message type that contains itself finds its own encoder.
        encoder = _encoders[desc.full_name] = _Encoder()
        try:
            encoder.encode = _compile(desc)
        except BaseException:
            del _encoders[desc.full_name]
            raise
        encoder.ready = True
    return encoder


def _input_only(fd: FieldDescriptor) -> bool:
    """Fields marked INPUT_ONLY (e.g. a peer's api_key) are never part of an answer, even when empty."""
    return field_behavior_pb2.INPUT_ONLY in fd.GetOptions().Extensions[field_behavior_pb2.field_behavior]


def _compile(desc: Descriptor) -> Callable[[Any], dict[str, Any]]:
    fields = [fd for fd in desc.fields if not _input_only(fd)]
    if not fields:
        return lambda msg: {}
    env: dict[str, Any] = {"read": operator.attrgetter(*(fd.name for fd in fields))}
    items = []
    for i, fd in enumerate(fields):
        expression = _field_expression(fd, f"v[{i}]", f"c{i}", env)
        if fd.has_presence:
            expression = f"({expression} if msg.HasField({fd.name!r}) else None)"
        items.append(f"{fd.name!r}: {expression}")
    read = "(read(msg),)" if len(fields) == 1 else "read(msg)"
    source = f"def encode(msg):\n    v = {read}\n    return {{{', '.join(items)}}}\n"
    exec(compile(source, f"<json encoder for {desc.full_name}>", "exec"), env)  # noqa: S102 (see above)
    encode: Callable[[Any], dict[str, Any]] = env["encode"]
    return encode


def _field_expression(fd: FieldDescriptor, value: str, slot: str, env: dict[str, Any]) -> str:
    """The Python expression for the field's JSON, given the expression `value` of its runtime value; the
    conversions it calls are put in `env` under `slot`."""
    if is_map(fd):
        entry = message_type(fd)
        key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
        key = _map_key_to_json if key_fd.type == _T.TYPE_BOOL else str
        item = _value_converter(value_fd)
        if item is None:
            env[slot] = lambda value: {key(k): value[k] for k in sorted(value)}
        else:
            env[slot] = lambda value: {key(k): item(value[k]) for k in sorted(value)}
        return f"{slot}({value})"
    if fd.type == _T.TYPE_ENUM:
        # An open enum can carry a number this build does not know; print it rather than lose it.
        env[slot] = enum_words(enum_type(fd)).to_word.get
        return f"[{slot}(x, x) for x in {value}]" if fd.is_repeated else f"{slot}({value}, {value})"
    convert = _value_converter(fd)
    if convert is None:
        return f"list({value})" if fd.is_repeated else value
    env[slot] = convert
    return f"[{slot}(x) for x in {value}]" if fd.is_repeated else f"{slot}({value})"


def _map_key_to_json(key: bool) -> str:
    return "true" if key else "false"


def _value_converter(fd: FieldDescriptor) -> _Convert | None:
    """The conversion of one (non-repeated) value of the field's type; None when it prints as it is."""
    kind = fd.type
    if kind in _AS_IS:
        return None
    if kind in (_T.TYPE_MESSAGE, _T.TYPE_GROUP):
        return _message_converter(message_type(fd))
    if kind == _T.TYPE_ENUM:
        # An open enum can carry a number this build does not know; print it rather than lose it.
        return enum_words(enum_type(fd)).json
    if kind == _T.TYPE_BYTES:
        return _bytes_to_json
    if kind == _T.TYPE_FLOAT:
        return _float32_to_json
    if kind == _T.TYPE_DOUBLE:
        return _double_to_json
    raise TypeError(f"{fd.full_name} has a type the edge cannot print: {kind}")


def _message_converter(desc: Descriptor) -> _Convert:
    """A message's JSON, with the well-known types in their special forms."""
    found = _message_converters.get(desc.full_name)
    if found is not None:
        return found
    name = desc.full_name
    convert: _Convert
    if name in (TIMESTAMP, DURATION):
        convert = _time_to_json
    elif name == FIELD_MASK:
        convert = _field_mask_to_json
    elif name in WRAPPERS:
        inner = _value_converter(desc.fields_by_name["value"])
        convert = _wrapper(inner)
    elif name in (STRUCT, VALUE, LIST_VALUE):
        convert = json_format.MessageToDict
    elif name == ANY:
        convert = any_to_json
    else:
        encoder = _encoder_of(desc)
        if not encoder.ready:
            # A message type that contains itself, met while its own encoder is being built.
            return lambda msg: encoder.encode(msg)
        convert = encoder.encode
    _message_converters[name] = convert
    return convert


def _wrapper(inner: _Convert | None) -> _Convert:
    if inner is None:
        return operator.attrgetter("value")
    return lambda msg: inner(msg.value)


def _time_to_json(msg: Any) -> str | None:
    # A backend's value outside what RFC 3339 can print (before year 1, past 9999) is null, not a 500.
    try:
        return str(msg.ToJsonString())
    except ValueError:
        return None


def _field_mask_to_json(msg: Any) -> str:
    return ",".join(msg.paths)


def _bytes_to_json(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _double_to_json(value: float) -> float | str:
    return _float_to_json(value, single=False)


def _float32_to_json(value: float) -> float | str:
    return _float_to_json(value, single=True)


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


# ------------------------------------------------------------------------------------- public API


def message_to_json(msg: message.Message) -> dict[str, Any]:
    """Every field, named as in the proto; unset message fields and unset optionals are null."""
    return _encoder_of(descriptor_of(msg)).encode(msg)


def field_to_json(msg: message.Message, fd: FieldDescriptor) -> Any:
    """One field's JSON value."""
    if fd.has_presence and not msg.HasField(fd.name):
        return None
    convert = _field_converters.get(fd.full_name)
    if convert is None:
        env: dict[str, Any] = {}
        source = f"def convert(value):\n    return {_field_expression(fd, 'value', 'c', env)}\n"
        exec(compile(source, f"<json encoder for {fd.full_name}>", "exec"), env)  # noqa: S102 (see _compile)
        convert = _field_converters[fd.full_name] = env["convert"]
    return convert(getattr(msg, fd.name))


def message_value_to_json(msg: message.Message) -> Any:
    """A message's JSON, with the well-known types in their special forms."""
    return _message_converter(descriptor_of(msg))(msg)


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
