"""A test-only API, agentvault.edgetest.v1, built at run time: every field kind and a server-streaming RPC."""

from __future__ import annotations

from typing import Any

from google.api import annotations_pb2
from google.protobuf import (  # the imports load the files the test proto depends on
    descriptor_pb2,
    descriptor_pool,
    field_mask_pb2,  # noqa: F401
    message_factory,
    struct_pb2,  # noqa: F401
    timestamp_pb2,  # noqa: F401
)
from google.protobuf.descriptor import ServiceDescriptor

PACKAGE = "agentvault.edgetest.v1"
SERVICE = f"{PACKAGE}.TestService"
_F = descriptor_pb2.FieldDescriptorProto


def _field(msg: Any, name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> None:
    label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    field = msg.field.add(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = type_name


def _bind(method: Any, verb: str, path: str, body: str = "", response_body: str = "", extra: Any = ()) -> None:
    rule = method.options.Extensions[annotations_pb2.http]
    setattr(rule, verb, path)
    rule.body = body
    rule.response_body = response_body
    for v, p, b in extra:
        more = rule.additional_bindings.add()
        setattr(more, v, p)
        more.body = b


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="agentvault/edgetest/v1/edgetest_service.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=[
            "google/api/annotations.proto",
            "google/protobuf/timestamp.proto",
            "google/protobuf/field_mask.proto",
            "google/protobuf/struct.proto",
        ],
    )
    color = f.enum_type.add(name="Color")
    for number, name in enumerate(("COLOR_UNSPECIFIED", "COLOR_RED", "COLOR_DEEP_BLUE")):
        color.value.add(name=name, number=number)
    c = f".{PACKAGE}.Color"

    inner = f.message_type.add(name="Inner")
    _field(inner, "note", 1, _F.TYPE_STRING)
    _field(inner, "level", 2, _F.TYPE_INT32)
    _field(inner, "color", 3, _F.TYPE_ENUM, c)

    probe = f.message_type.add(name="Probe")
    entry = probe.nested_type.add(name="CountsEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_INT64)
    _field(probe, "name", 1, _F.TYPE_STRING)
    _field(probe, "small", 2, _F.TYPE_INT32)
    _field(probe, "big", 3, _F.TYPE_INT64)
    _field(probe, "ubig", 4, _F.TYPE_UINT64)
    _field(probe, "flag", 5, _F.TYPE_BOOL)
    _field(probe, "ratio", 6, _F.TYPE_DOUBLE)
    _field(probe, "single", 7, _F.TYPE_FLOAT)
    _field(probe, "color", 8, _F.TYPE_ENUM, c)
    _field(probe, "tags", 9, _F.TYPE_STRING, repeated=True)
    _field(probe, "colors", 10, _F.TYPE_ENUM, c, repeated=True)
    _field(probe, "inner", 11, _F.TYPE_MESSAGE, f".{PACKAGE}.Inner")
    _field(probe, "counts", 12, _F.TYPE_MESSAGE, f".{PACKAGE}.Probe.CountsEntry", repeated=True)
    _field(probe, "blob", 13, _F.TYPE_BYTES)
    _field(probe, "at", 14, _F.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    _field(probe, "mask", 15, _F.TYPE_MESSAGE, ".google.protobuf.FieldMask")
    _field(probe, "inners", 16, _F.TYPE_MESSAGE, f".{PACKAGE}.Inner", repeated=True)
    _field(probe, "extra", 17, _F.TYPE_MESSAGE, ".google.protobuf.Struct")

    echoed = f.message_type.add(name="Echoed")
    _field(echoed, "method", 1, _F.TYPE_STRING)
    _field(echoed, "probe", 2, _F.TYPE_MESSAGE, f".{PACKAGE}.Probe")

    svc = f.service.add(name="TestService")
    p, e = f".{PACKAGE}.Probe", f".{PACKAGE}.Echoed"

    def method(name: str, streaming: bool = False) -> Any:
        return svc.method.add(name=name, input_type=p, output_type=e, server_streaming=streaming)

    _bind(
        method("Echo"),
        "get",
        "/api/v1/test/echo",
        extra=[("post", "/api/v1/test/echo", "*"), ("put", "/api/v1/test/echo/inner", "inner")],
    )
    _bind(method("GetThing"), "get", "/api/v1/test/things/{name}")
    _bind(method("Special"), "get", "/api/v1/test/things/special")
    _bind(method("SearchThings"), "get", "/api/v1/test/things:search")
    _bind(method("Nested"), "get", "/api/v1/test/nested/{inner.note}/{big}", response_body="probe")
    _bind(method("Files"), "get", "/api/v1/test/files/{name=**}")
    _bind(method("Watch", streaming=True), "get", "/api/v1/test/watch/{name}")
    return f


def test_service() -> ServiceDescriptor:
    """The TestService descriptor, added to the default pool once per process."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName(SERVICE)
    except KeyError:
        pool.AddSerializedFile(_file().SerializeToString())
        return pool.FindServiceByName(SERVICE)


test_service.__test__ = False  # type: ignore[attr-defined]


def message_class(name: str) -> Any:
    test_service()
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(f"{PACKAGE}.{name}"))
