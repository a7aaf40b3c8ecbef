"""The comments of our protos by full name: descriptions for the OpenAPI document."""

from __future__ import annotations

import functools
import importlib.resources

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from agentvault.common.enums import enum_words
from agentvault_edge.transcode import enum_type

_T = FieldDescriptor
# Field numbers in descriptor.proto, as source_code_info paths spell them.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def _names(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Full names by source_code_info path, for every element of a file that can carry a comment."""
    names: dict[tuple[int, ...], str] = {}

    def message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full = f"{scope}.{msg.name}"
        names[path] = full
        for i, fd in enumerate(msg.field):
            names[(*path, _MESSAGE_FIELD, i)] = f"{full}.{fd.name}"
        for i, nested in enumerate(msg.nested_type):
            message(nested, (*path, _MESSAGE_NESTED, i), full)
        for i, enum in enumerate(msg.enum_type):
            enumeration(enum, (*path, _MESSAGE_ENUM, i), full)

    def enumeration(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        names[path] = f"{scope}.{enum.name}"
        for i, value in enumerate(enum.value):
            # Enum values are scoped beside their enum, as in C++.
            names[(*path, _ENUM_VALUE, i)] = f"{scope}.{value.name}"

    for i, msg in enumerate(file.message_type):
        message(msg, (_FILE_MESSAGE, i), file.package)
    for i, enum in enumerate(file.enum_type):
        enumeration(enum, (_FILE_ENUM, i), file.package)
    for i, service in enumerate(file.service):
        names[(_FILE_SERVICE, i)] = f"{file.package}.{service.name}"
        for j, method in enumerate(service.method):
            names[(_FILE_SERVICE, i, _SERVICE_METHOD, j)] = f"{file.package}.{service.name}.{method.name}"
    return names


@functools.cache
def comments() -> dict[str, str]:
    """The leading comment of every message, field, enum, enum value, service and method of our protos, by full
    name, from the descriptor set scripts/protogen.py writes with source info; empty when it is not installed."""
    try:
        raw = importlib.resources.files("agentvault.common").joinpath("protos.binpb").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        return {}
    found: dict[str, str] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(raw).file:
        names = _names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = " ".join(line.strip() for line in location.leading_comments.strip().splitlines())
            if name is not None and text:
                found[name] = text
    return found


def field_description(fd: FieldDescriptor) -> str:
    """The field's proto comment; for an enum, followed by what each word means."""
    text = comments().get(fd.full_name, "")
    if fd.type == _T.TYPE_ENUM:
        enum = enum_type(fd)
        words = enum_words(enum)
        scope = enum.full_name.rsplit(".", 1)[0]
        meanings = [
            f"{words.to_word[v.number]}: {comments()[f'{scope}.{v.name}']}"
            for v in enum.values
            if f"{scope}.{v.name}" in comments()
        ]
        if meanings:
            text = f"{text} {' '.join(meanings)}".strip()
    return text
