"""Plain Python and JSON values <-> registry messages, with enums as the lowercase words the REST API uses.

An enum's word is its value name without the type prefix that its `*_UNSPECIFIED` zero value carries,
lowercased: CAPABILITY_KIND_SKILL <-> "skill", PROTOCOL_HTTP <-> "http", SHARING_FEDERATED <-> "federated".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from agentvault.common.enums import enum_words as shared_enum_words
from agentvault.registry.v1 import registry_service_pb2 as pb

M = TypeVar("M", bound=Message)


def enum_words(enum: EnumDescriptor) -> list[str]:
    """The words a caller may use for `enum`; the zero value is "not set" and has none."""
    return list(shared_enum_words(enum).words)


def enum_word(enum: EnumDescriptor, value: int | str) -> str | int:
    """The word for a number or a value name; a number this build does not know is returned unchanged."""
    words = shared_enum_words(enum)
    if isinstance(value, int):
        return words.json(value)
    number = words.number(value)
    return words.to_word[number] if number is not None else value.lower()


def enum_number(enum: EnumDescriptor, value: int | str, where: str) -> int:
    """The number for a word ("skill"), a value name ("CAPABILITY_KIND_SKILL") or a known number; "" is 0."""
    if isinstance(value, str) and not value.strip():
        return 0
    words = shared_enum_words(enum)
    number = words.number(value)
    if number is None or (number == 0 and isinstance(value, str)):
        raise ValueError(f"{where}: must be one of {words.choices()}; got {value!r}")
    return number


def _nested(fd: FieldDescriptor) -> Descriptor | None:
    """The message type to recurse into, or None for scalars, maps and well-known types printed as strings."""
    mt = fd.message_type
    if mt is None or mt.GetOptions().map_entry or mt.full_name.startswith("google.protobuf."):
        return None
    return mt


def _names_to_words(desc: Descriptor, data: dict[str, Any]) -> None:
    for fd in desc.fields:
        if fd.name not in data:
            continue
        value = data[fd.name]
        if fd.enum_type is not None:
            data[fd.name] = (
                [enum_word(fd.enum_type, v) for v in value] if fd.is_repeated else enum_word(fd.enum_type, value)
            )
        elif (nested := _nested(fd)) is not None:
            for item in value if fd.is_repeated else [value]:
                if isinstance(item, dict):
                    _names_to_words(nested, item)


def to_dict(message: Message) -> dict[str, Any]:
    """The message as the REST API prints it: every field, snake_case names, enum words, int64 as numbers."""
    data = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    _names_to_words(cast(Descriptor, message.DESCRIPTOR), data)
    return data


def _name(enum: EnumDescriptor, value: Any, where: str) -> str:
    return str(enum.values_by_number[enum_number(enum, value, where)].name)


def _words_to_names(desc: Descriptor, data: Mapping[str, Any], path: str) -> dict[str, Any]:
    out = dict(data)
    for key, value in data.items():
        fd = desc.fields_by_name.get(key) or desc.fields_by_camelcase_name.get(key)
        if fd is None:
            continue  # ParseDict names the unknown field
        where = f"{path}{key}"
        if fd.enum_type is not None and value is not None:
            enum = fd.enum_type
            if fd.is_repeated and isinstance(value, list):
                out[key] = [
                    enum.values_by_number[enum_number(enum, v, f"{where}[{i}]")].name for i, v in enumerate(value)
                ]
            elif not fd.is_repeated:
                out[key] = _name(enum, value, where)
        elif (nested := _nested(fd)) is not None:
            if fd.is_repeated and isinstance(value, list):
                out[key] = [
                    _words_to_names(nested, v, f"{where}[{i}].") if isinstance(v, Mapping) else v
                    for i, v in enumerate(value)
                ]
            elif isinstance(value, Mapping):
                out[key] = _words_to_names(nested, value, f"{where}.")
    return out


def from_dict(data: Mapping[str, Any], message_type: type[M], path: str = "") -> M:
    """Parses the REST JSON shape (snake_case or camelCase names, enum words); ValueError names what is wrong.
    `path` prefixes field names in those errors, e.g. `capabilities[0].`."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}expected a JSON object for {message_type.DESCRIPTOR.name}, got {type(data).__name__}")
    converted = _words_to_names(cast(Descriptor, message_type.DESCRIPTOR), data, path)
    try:
        return json_format.ParseDict(converted, message_type())
    except json_format.ParseError as exc:
        # The first line says what and where; the rest lists every field of the type.
        where = f"{path.rstrip('.')}: " if path else ""
        raise ValueError(where + str(exc).splitlines()[0]) from None


def capability(
    kind: str | int, name: str, version: str = "", description: str = "", *, where: str = "capability.kind"
) -> pb.Capability:
    return pb.Capability(
        kind=enum_number(pb.CapabilityKind.DESCRIPTOR, kind, where),  # type: ignore[arg-type]
        name=name,
        version=version,
        description=description,
    )


def endpoint(protocol: str | int, url: str, *, where: str = "endpoint.protocol") -> pb.Endpoint:
    return pb.Endpoint(
        protocol=enum_number(pb.Protocol.DESCRIPTOR, protocol, where),  # type: ignore[arg-type]
        url=url,
    )


def parse_capability(text: str) -> pb.Capability:
    """`kind:name[@version]`, e.g. `skill:summarize@1.2.0`; names never contain `@`."""
    kind, sep, rest = text.partition(":")
    name, _, version = rest.partition("@")
    if not sep or not kind or not name:
        raise ValueError(f"capability {text!r}: expected kind:name[@version], e.g. skill:summarize@1.2.0")
    return capability(kind, name, version, where=f"capability {text!r}: kind")


def parse_endpoint(text: str) -> pb.Endpoint:
    """`protocol=url`, e.g. `http=https://agent.example/api`; only the first `=` separates."""
    protocol, sep, url = text.partition("=")
    if not sep or not protocol or not url:
        raise ValueError(f"endpoint {text!r}: expected protocol=url, e.g. http=https://agent.example/api")
    return endpoint(protocol, url, where=f"endpoint {text!r}: protocol")


def build_agent(
    *,
    did: str = "",
    name: str = "",
    version: str = "",
    description: str = "",
    agent_type: str = "",
    tags: Iterable[str] = (),
    capabilities: Iterable[pb.Capability | Mapping[str, Any]] = (),
    endpoints: Iterable[pb.Endpoint | Mapping[str, Any]] = (),
    sharing: str | int = "",
    health_check_url: str = "",
    id: str = "",
) -> pb.Agent:
    """An Agent from plain values; enums may be words (`"skill"`, `"http"`, `"federated"`), dicts stand for
    capabilities and endpoints in their JSON shape. A bad enum word raises ValueError naming the field."""
    return pb.Agent(
        id=id,
        did=did,
        name=name,
        version=version,
        description=description,
        agent_type=agent_type,
        tags=list(tags),
        capabilities=[
            c if isinstance(c, pb.Capability) else from_dict(c, pb.Capability, f"capabilities[{i}].")
            for i, c in enumerate(capabilities)
        ],
        endpoints=[
            e if isinstance(e, pb.Endpoint) else from_dict(e, pb.Endpoint, f"endpoints[{i}].")
            for i, e in enumerate(endpoints)
        ],
        sharing=enum_number(pb.Sharing.DESCRIPTOR, sharing, "sharing"),  # type: ignore[arg-type]
        health_check_url=health_check_url,
    )
