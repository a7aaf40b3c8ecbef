"""OpenAPI 3.1 document generated from the route table and the message descriptors."""

from __future__ import annotations

from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from agentvault_edge.routes import Route, RouteTable
from agentvault_edge.transcode import (
    ANY,
    DURATION,
    EMPTY,
    FIELD_MASK,
    INT_RANGES,
    LIST_VALUE,
    STRING_FORM_WKT,
    STRUCT,
    TIMESTAMP,
    VALUE,
    WELL_KNOWN,
    WRAPPERS,
    enum_type,
    enum_words,
    is_map,
    message_type,
)

_T = FieldDescriptor
_OPENAPI_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
_QUERY_DEPTH = 3
_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


class _SchemaBuilder:
    """Builds components/schemas on demand, one per message type reached from a route."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def message(self, desc: Descriptor) -> dict[str, Any]:
        if desc.full_name in WELL_KNOWN:
            return self._well_known(desc)
        name = desc.full_name
        if name not in self.schemas:
            self.schemas[name] = {}  # reserved first, so recursive messages terminate
            properties: dict[str, Any] = {}
            required: list[str] = []
            for fd in desc.fields:
                schema = self.field(fd)
                behaviors = set(fd.GetOptions().Extensions[field_behavior_pb2.field_behavior])
                if field_behavior_pb2.OUTPUT_ONLY in behaviors:
                    schema = {**schema, "readOnly": True}
                if field_behavior_pb2.REQUIRED in behaviors:
                    required.append(fd.name)
                properties[fd.name] = schema
            schema_obj: dict[str, Any] = {"type": "object", "properties": properties}
            if required:
                schema_obj["required"] = required
            self.schemas[name] = schema_obj
        return _ref(name)

    def field(self, fd: FieldDescriptor) -> dict[str, Any]:
        if is_map(fd):
            return {"type": "object", "additionalProperties": self.value(message_type(fd).fields_by_name["value"])}
        if fd.is_repeated:
            return {"type": "array", "items": self.value(fd)}
        schema = self.value(fd)
        if fd.has_presence:
            # The edge prints unset message fields and unset optionals as null.
            return {"anyOf": [schema, {"type": "null"}]}
        return schema

    def value(self, fd: FieldDescriptor) -> dict[str, Any]:
        kind = fd.type
        if kind in (_T.TYPE_MESSAGE, _T.TYPE_GROUP):
            return self.message(message_type(fd))
        return scalar_schema(fd)

    def _well_known(self, desc: Descriptor) -> dict[str, Any]:
        name = desc.full_name
        if name == TIMESTAMP:
            return {"type": "string", "format": "date-time"}
        if name == DURATION:
            return {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "examples": ["1.5s"]}
        if name == FIELD_MASK:
            return {"type": "string", "description": "Comma-separated field paths, e.g. name,description."}
        if name == STRUCT:
            return {"type": "object"}
        if name == LIST_VALUE:
            return {"type": "array"}
        if name == VALUE:
            return {}
        if name == EMPTY:
            return {"type": "object", "properties": {}}
        if name == ANY:
            return {
                "type": "object",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
                "additionalProperties": True,
            }
        assert name in WRAPPERS
        return scalar_schema(desc.fields_by_name["value"])


def scalar_schema(fd: FieldDescriptor) -> dict[str, Any]:
    kind = fd.type
    if kind == _T.TYPE_ENUM:
        return {"type": "string", "enum": list(enum_words(enum_type(fd)).words)}
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        wide = high > 2**32
        schema: dict[str, Any] = {"type": "integer", "format": "int64" if wide else "int32"}
        if low == 0:
            schema["minimum"] = 0
        return schema
    if kind == _T.TYPE_FLOAT:
        return {"type": "number", "format": "float"}
    if kind == _T.TYPE_DOUBLE:
        return {"type": "number", "format": "double"}
    if kind == _T.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == _T.TYPE_BYTES:
        return {"type": "string", "format": "byte"}
    return {"type": "string"}


def _query_fields(
    desc: Descriptor, prefix: str, excluded: set[str], depth: int, seen: frozenset[str]
) -> list[tuple[str, FieldDescriptor]]:
    """Fields a query parameter may set: scalars, enums, repeated scalars and string-form well-known types."""
    found: list[tuple[str, FieldDescriptor]] = []
    for fd in desc.fields:
        name = prefix + fd.name
        if name in excluded or is_map(fd):
            continue
        if fd.type == _T.TYPE_MESSAGE:
            full = message_type(fd).full_name
            if fd.is_repeated:
                continue
            if full in STRING_FORM_WKT or full in WRAPPERS:
                found.append((name, fd))
            elif full not in WELL_KNOWN and full not in seen and depth < _QUERY_DEPTH:
                found.extend(_query_fields(message_type(fd), name + ".", excluded, depth + 1, seen | {full}))
            continue
        found.append((name, fd))
    return found


def _operation(route: Route, builder: _SchemaBuilder) -> dict[str, Any]:
    desc = route.method.input_type
    bound = {v.field_path for v in route.template.variables}
    parameters: list[dict[str, Any]] = []
    for var in route.template.variables:
        leaf = _leaf(desc, var.field_path)
        parameters.append({"name": var.field_path, "in": "path", "required": True, "schema": builder.value(leaf)})
    if route.body != "*":
        excluded = set(bound)
        if route.body:
            excluded.add(route.body)
        for name, fd in _query_fields(desc, "", excluded, 0, frozenset({desc.full_name})):
            if any(name.startswith(p + ".") for p in bound):
                continue
            schema = {"type": "array", "items": builder.value(fd)} if fd.is_repeated else builder.value(fd)
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema})

    if route.response_body:
        response_schema = builder.field(route.method.output_type.fields_by_name[route.response_body])
    else:
        response_schema = builder.message(route.method.output_type)
    media = "text/event-stream" if route.server_streaming else "application/json"
    ok_description = "A stream of messages, one JSON object per event." if route.server_streaming else "OK"
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [route.service.full_name],
        "summary": f"{route.service.name}.{route.method.name}",
        "parameters": parameters,
        "responses": {
            "200": {"description": ok_description, "content": {media: {"schema": response_schema}}},
            "default": {"description": "An error.", "content": {"application/json": {"schema": _ERROR_REF}}},
        },
    }
    if route.body:
        body_schema = builder.message(desc) if route.body == "*" else builder.field(desc.fields_by_name[route.body])
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    if route.http_method == "PATCH" and "update_mask" in desc.fields_by_name:
        operation["description"] = (
            "Without an update_mask query parameter, the mask is the top-level fields of the JSON body."
        )
    return operation


def _leaf(desc: Descriptor, dotted: str) -> FieldDescriptor:
    current = desc
    parts = dotted.split(".")
    for part in parts[:-1]:
        current = message_type(current.fields_by_name[part])
    return current.fields_by_name[parts[-1]]


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "status", "message", "details"],
                "properties": {
                    "code": {"type": "integer", "description": "The HTTP status."},
                    "status": {"type": "string", "description": "The gRPC status code name."},
                    "message": {"type": "string"},
                    "details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"@type": {"type": "string"}},
                            "additionalProperties": True,
                        },
                    },
                },
            }
        },
    }


def build_openapi(table: RouteTable, title: str = "AgentVault Mesh", version: str = "v1") -> dict[str, Any]:
    builder = _SchemaBuilder()
    paths: dict[str, dict[str, Any]] = {}
    for route in table.routes:
        verb = route.http_method.lower()
        if verb not in _OPENAPI_METHODS:
            continue
        paths.setdefault(route.template.openapi_path, {})[verb] = _operation(route, builder)
    schemas = dict(sorted(builder.schemas.items()))
    schemas["Error"] = _error_schema()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Generated from the google.api.http annotations of the gRPC services.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # Optional: some routes (health) answer anonymous callers; the services decide.
        "security": [{"bearer": []}, {}],
    }
