"""OpenAPI 3.1 document generated from the route table and the message descriptors."""

from __future__ import annotations

import re
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from agentvault.common.enums import enum_words
from agentvault_edge.openapi_rules import (
    AGENT_EXAMPLE,
    REGISTRY,
    auth_variants,
    constraints,
    endpoint_variants,
    request_objects,
)
from agentvault_edge.proto_comments import comments, field_description
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
    is_map,
    message_type,
)

_T = FieldDescriptor
_B = field_behavior_pb2
_OPENAPI_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
_QUERY_DEPTH = 3
_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("anyOf") and {"type": "null"} in schema["anyOf"]:
        return schema
    extra: dict[str, Any] = {k: schema[k] for k in ("readOnly", "writeOnly", "description") if k in schema}
    inner = {k: v for k, v in schema.items() if k not in extra}
    return {"anyOf": [inner, {"type": "null"}], **extra}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _behaviors(fd: FieldDescriptor) -> set[int]:
    return set(fd.GetOptions().Extensions[_B.field_behavior])


# Suffix of the request form of a message's schema; lowercase, so it cannot be a nested message's name.
INPUT_SUFFIX = ".input"


class _SchemaBuilder:
    """Builds components/schemas on demand, one per message type reached from a route, in the form requests take
    (`request`: every optional field may also be null, which proto3 JSON reads as unset) or responses take."""

    def __init__(self, schemas: dict[str, Any], *, request: bool) -> None:
        self.schemas = schemas
        self.request = request
        self.rules = constraints()

    def message(self, desc: Descriptor, excluded: frozenset[str] = frozenset()) -> dict[str, Any]:
        """A $ref to the message's schema; inline, without them, when fields are `excluded` (bound by the path)."""
        if desc.full_name in WELL_KNOWN:
            return self._well_known(desc)
        name = desc.full_name + (INPUT_SUFFIX if self.request else "")
        if excluded:
            return self._object(desc, excluded)
        if name not in self.schemas:
            self.schemas[name] = {}  # reserved first, so recursive messages terminate
            self.schemas[name] = self._object(desc, excluded)
        return _ref(name)

    def _object(self, desc: Descriptor, excluded: frozenset[str]) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        for fd in desc.fields:
            if fd.name in excluded:
                continue
            schema = self.field(fd)
            text = field_description(fd)
            if text:
                schema = {**schema, "description": text}
            behaviors = _behaviors(fd)
            if _B.OUTPUT_ONLY in behaviors:
                schema = {**schema, "readOnly": True}
            if _B.INPUT_ONLY in behaviors:
                schema = {**schema, "writeOnly": True}
            if _B.REQUIRED in behaviors:
                required.append(fd.name)
            elif self.request:
                # proto3 JSON: null sets a field to its default, which is what leaving it out does.
                schema = nullable(schema)
            properties[fd.name] = schema
        # The edge refuses fields the message does not have.
        schema_obj: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema_obj["required"] = required
        if desc.full_name == REGISTRY + "Endpoint":
            schema_obj["anyOf"] = endpoint_variants()
        if desc.full_name == REGISTRY + "AgentAuth" and self.request:
            # Answers carry no secrets; only a request must bring its kind's.
            schema_obj["anyOf"] = auth_variants()
        if desc.full_name == REGISTRY + "Agent":
            schema_obj["examples"] = [AGENT_EXAMPLE]
        if self.request:
            schema_obj.update(request_objects().get(desc.full_name, {}))
        text = comments().get(desc.full_name, "")
        if desc.full_name == REGISTRY + "Agent" or desc.full_name == REGISTRY + "Capability":
            text = f"{text} Capabilities must be unique by (kind, name) within an agent.".strip()
        if text:
            schema_obj["description"] = text
        return schema_obj

    def field(self, fd: FieldDescriptor) -> dict[str, Any]:
        key = (fd.full_name.rsplit(".", 1)[0], fd.name)
        if is_map(fd):
            value = self.value(message_type(fd).fields_by_name["value"])
            return {"type": "object", "additionalProperties": value, **self.rules.get(key, {})}
        if fd.is_repeated:
            items = {**self.value(fd), **self.rules.get((key[0], key[1] + "[]"), {})}
            return {"type": "array", "items": items, **self.rules.get(key, {})}
        schema = {**self.value(fd), **self.rules.get(key, {})}
        if fd.has_presence and not (self.request and _B.REQUIRED in _behaviors(fd)):
            # The edge prints unset message fields and unset optionals as null; a request's required one is not.
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
        words = enum_words(enum_type(fd))
        choices = list(words.words)
        if _B.REQUIRED not in _behaviors(fd):
            # The zero value means "not set" and is printed as its word; a request may send it too.
            choices.append(words.to_word[0])
        return {"type": "string", "enum": choices}
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


def _body_required(route: Route) -> bool:
    """Whether the request cannot be valid without a body: only when the body holds a REQUIRED field.

    An empty body is an empty message (google.api.http), so e.g. `POST /api/v1/api-keys/{id}:revoke`, whose
    only field is bound by the path, is complete without one."""
    desc = route.method.input_type
    bound = {v.field_path.split(".")[0] for v in route.template.variables if "." not in v.field_path}
    if route.body == "*":
        return any(_B.REQUIRED in _behaviors(fd) for fd in desc.fields if fd.name not in bound)
    return _B.REQUIRED in _behaviors(desc.fields_by_name[route.body])


def _operation(route: Route, inputs: _SchemaBuilder, outputs: _SchemaBuilder, names: list[str]) -> dict[str, Any]:
    """One operation; `names` are the document's names for the path variables, in order (see build_openapi)."""
    desc = route.method.input_type
    bound = {v.field_path for v in route.template.variables}
    parameters: list[dict[str, Any]] = []
    for var, name in zip(route.template.variables, names, strict=True):
        leaf = _leaf(desc, var.field_path)
        parameter: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": inputs.field(leaf)}
        text = field_description(leaf)
        if name != var.field_path:
            text = f"Sets the request's {var.field_path}. {text}".strip()
        if text:
            parameter["description"] = text
        parameters.append(parameter)
    if route.body != "*":
        excluded = set(bound)
        if route.body:
            excluded.add(route.body)
        for name, fd in _query_fields(desc, "", excluded, 0, frozenset({desc.full_name})):
            if any(name.startswith(p + ".") for p in bound):
                continue
            schema = inputs.field(fd)
            if fd.has_presence and "anyOf" in schema:
                schema = schema["anyOf"][0]  # a query string has no null: leaving it out is unset
            parameter = {"name": name, "in": "query", "required": False, "schema": schema}
            text = field_description(fd)
            if text:
                parameter["description"] = text
            parameters.append(parameter)

    if route.response_body:
        response_schema = outputs.field(route.method.output_type.fields_by_name[route.response_body])
    else:
        response_schema = outputs.message(route.method.output_type)
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
        required = _body_required(route)
        if route.body == "*":
            top = frozenset(v.field_path for v in route.template.variables if "." not in v.field_path)
            body_schema = inputs.message(desc, top)
        else:
            body_fd = desc.fields_by_name[route.body]
            # A PATCH body is the whole message too: which of its fields a PATCH needs depends on update_mask,
            # which JSON Schema cannot relate to the body; the required ones are what a caller can always send.
            body_schema = inputs.value(body_fd) if body_fd.type == _T.TYPE_MESSAGE else inputs.field(body_fd)
        if not required:
            # A JSON null body is read as no body: an empty message.
            body_schema = nullable(body_schema)
        operation["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": body_schema}},
        }
    text = comments().get(route.method.full_name, "")
    if route.http_method == "PATCH" and "update_mask" in desc.fields_by_name:
        text += " Without an update_mask query parameter, the mask is the top-level fields of the JSON body."
    if text.strip():
        operation["description"] = text.strip()
    return operation


def _websocket(route: Route, inputs: _SchemaBuilder, outputs: _SchemaBuilder) -> dict[str, Any]:
    """A client- or bidirectional-streaming route: a GET upgraded to a WebSocket, one JSON message per frame."""
    text = comments().get(route.method.full_name, "").strip()
    return {
        "operationId": route.operation_id,
        "summary": f"{route.service.name}.{route.method.name}",
        **({"description": text} if text else {}),
        "protocol": "websocket",
        # Each text frame the client sends; an empty frame ends the requests.
        "request": inputs.message(route.method.input_type),
        # Each text frame the edge sends; before a close other than 1000 (1001 excepted), an Error frame.
        "response": outputs.message(route.method.output_type),
        "error": _ERROR_REF,
    }


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


_VARIABLE = re.compile(r"\{[^}]*\}")


def normalized_path(path: str) -> str:
    """The path with every variable written `{}`: two templates that normalize alike are one path to OpenAPI."""
    return _VARIABLE.sub("{}", path)


def _variable_names(table: RouteTable) -> dict[str, list[str]]:
    """One name per variable position for each normalized path: GET /agents/{id} and PATCH /agents/{agent.id}
    are one OpenAPI path, so both are written with one name (the plainest: fewest dots, then shortest)."""
    candidates: dict[str, list[list[str]]] = {}
    for route in table.routes:
        key = normalized_path(route.template.openapi_path)
        per_position = candidates.setdefault(key, [[] for _ in route.template.variables])
        for position, var in enumerate(route.template.variables):
            per_position[position].append(var.field_path)
    return {
        key: [min(names, key=lambda n: (n.count("."), len(n), n)) for names in positions]
        for key, positions in candidates.items()
    }


def _named(path: str, names: list[str]) -> str:
    chosen = iter(names)
    return _VARIABLE.sub(lambda _: "{" + next(chosen) + "}", path)


def build_openapi(table: RouteTable, title: str = "AgentVault Mesh", version: str = "v1") -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    inputs, outputs = _SchemaBuilder(schemas, request=True), _SchemaBuilder(schemas, request=False)
    paths: dict[str, dict[str, Any]] = {}
    names = _variable_names(table)
    websockets: dict[str, Any] = {}
    for route in table.routes:
        verb = route.http_method.lower()
        if route.client_streaming:
            # A WebSocket is no HTTP operation OpenAPI can describe (or a client like schemathesis call): it is
            # listed beside the paths instead, with the schemas of its frames.
            websockets[route.template.openapi_path] = _websocket(route, inputs, outputs)
            continue
        if verb not in _OPENAPI_METHODS:
            continue
        chosen = names[normalized_path(route.template.openapi_path)]
        paths.setdefault(_named(route.template.openapi_path, chosen), {})[verb] = _operation(
            route, inputs, outputs, chosen
        )
    schemas = dict(sorted(schemas.items()))
    schemas["Error"] = _error_schema()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Generated from the google.api.http annotations of the gRPC services.",
        },
        "paths": dict(sorted(paths.items())),
        "x-websockets": dict(sorted(websockets.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # Optional: some routes (health) answer anonymous callers; the services decide.
        "security": [{"bearer": []}, {}],
    }
