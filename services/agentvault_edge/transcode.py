"""What the edge's JSON <-> protobuf transcoding shares: well-known type names, integer ranges, descriptor helpers."""

from __future__ import annotations

from typing import cast

from google.protobuf import message
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, OneofDescriptor

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


def is_map(fd: FieldDescriptor) -> bool:
    return fd.type == _T.TYPE_MESSAGE and fd.is_repeated and message_type(fd).GetOptions().map_entry


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
