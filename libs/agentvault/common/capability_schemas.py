"""Capabilities' JSON Schemas: bounded parsing, checking a schema, and whether an input or an expected output fits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema
import jsonschema_rs
import referencing.exceptions
from jsonschema import validators

from agentvault.common.agents import Violations

MAX_SCHEMA_BYTES = 16 * 1024
MAX_INPUT_BYTES = 64 * 1024
MAX_DEPTH = 32
# An A2A agent card the registry reads (fetched or given), with the same depth bound.
MAX_CARD_BYTES = 64 * 1024
# An input with many errors is described by its first ones: the answer stays small.
MAX_INPUT_ERRORS = 20
MAX_OUTPUT_REASONS = 50
DEFAULT_DIALECT = validators.Draft202012Validator

INPUT_INVALID = "INPUT_INVALID"
OUTPUT_FIELD_MISSING = "OUTPUT_FIELD_MISSING"
OUTPUT_TYPE_DIFFERS = "OUTPUT_TYPE_DIFFERS"


@dataclass(frozen=True)
class Reason:
    code: str
    pointer: str
    message: str


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text, counted before parsing: the parser recurses, so a deep
    document would exhaust the stack rather than fail cleanly."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, max_bytes: int) -> Any:
    """JSON text bounded in size and depth; ValueError says why not."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ValueError(f"must be at most {max_bytes} bytes (got {size})")
    if nesting_depth(text) > MAX_DEPTH:
        raise ValueError(f"must nest at most {MAX_DEPTH} levels deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"is not valid JSON: {exc}"[:300]) from None


def _remote_refs(node: Any, path: str = "") -> str | None:
    """The first $ref that leaves the document (path and value): schemas are checked offline, never fetched."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str) and not value.startswith("#"):
                return f"{path}/{key} = {value[:80]!r}"
            found = _remote_refs(value, f"{path}/{key}")
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _remote_refs(value, f"{path}/{i}")
            if found:
                return found
    return None


def load_schema(text: str) -> Any:
    """A capability's schema from its text: bounded, a JSON object (or boolean), valid against its dialect's
    meta-schema (2020-12 unless it names another), with only local references. ValueError says why not."""
    schema = parse_json(text, MAX_SCHEMA_BYTES)
    if not isinstance(schema, dict | bool):
        raise ValueError("must be a JSON Schema: a JSON object or a boolean")
    remote = _remote_refs(schema)
    if remote:
        raise ValueError(f"may only reference its own definitions (#...): {remote}")
    try:
        validator_class(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.absolute_path) if exc.absolute_path else "the root"
        raise ValueError(f"is not a valid JSON Schema at {where}: {exc.message}"[:300]) from None
    try:
        compiled(schema)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        first = str(exc).split("\n", 1)[0]
        raise ValueError(f"cannot be applied: {first}"[:300]) from None
    return schema


def compiled(schema: Any) -> Any:
    """The schema ready to validate untrusted JSON. The Rust validator with the `regex` crate's patterns: matching
    takes linear time, where Python's re backtracks exponentially on patterns like ^(a+)+$ (anyone may register
    a schema, and anyone may send input to check against it); patterns needing backtracking are refused."""
    return jsonschema_rs.validator_for(schema, pattern_options=jsonschema_rs.RegexOptions(), offline=True)


def validator_class(schema: Any) -> Any:
    try:
        return validators.validator_for(schema, default=DEFAULT_DIALECT)
    except referencing.exceptions.Unresolvable:
        return DEFAULT_DIALECT


def check_schema(v: Violations, path: str, text: str) -> None:
    """Adds a violation at `path` when `text` is set and is not a schema load_schema takes."""
    if not text:
        return
    try:
        load_schema(text)
    except ValueError as exc:
        v.add(path, str(exc))


def pointer(parts: Any) -> str:
    """An RFC 6901 JSON pointer from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def input_reasons(schema: Any, instance: Any) -> list[Reason]:
    """Why `instance` does not satisfy `schema` (a loaded schema): the first errors, each with its pointer."""
    found = []
    try:
        for error in compiled(schema).iter_errors(instance):
            found.append(Reason(INPUT_INVALID, pointer(error.instance_path), error.message[:300]))
            if len(found) >= MAX_INPUT_ERRORS:
                break
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        reason = str(exc).split("\n", 1)[0]
        found.append(Reason(INPUT_INVALID, "", f"the capability's input schema cannot be applied: {reason}"[:300]))
    return found


def _types(schema: Any) -> set[str] | None:
    if not isinstance(schema, dict) or "type" not in schema:
        return None
    stated = schema["type"]
    return {stated} if isinstance(stated, str) else {t for t in stated if isinstance(t, str)}


def _fits(produced: set[str], accepted: set[str]) -> bool:
    # Every integer is a number: an output of integers fits a caller expecting numbers.
    return all(t in accepted or (t == "integer" and "number" in accepted) for t in produced)


def output_reasons(advertised: Any, expected: Any) -> list[Reason]:
    """Whether what a capability says it returns (`advertised`) gives a caller what it expects (`expected`):
    each field the caller requires must be one the capability always returns, and each field both describe must
    have a type the caller accepts. Pointers name places in the output document."""
    found: list[Reason] = []
    _compare(advertised if isinstance(advertised, dict) else {}, expected, [], found)
    return found[:MAX_OUTPUT_REASONS]


def _compare(advertised: dict[str, Any], expected: Any, path: list[str], found: list[Reason]) -> None:
    if not isinstance(expected, dict) or len(found) >= MAX_OUTPUT_REASONS:
        return
    produced, accepted = _types(advertised), _types(expected)
    if produced is not None and accepted is not None and not _fits(produced, accepted):
        found.append(
            Reason(
                OUTPUT_TYPE_DIFFERS,
                pointer(path),
                f"the capability returns {'/'.join(sorted(produced))}, expected {'/'.join(sorted(accepted))}",
            )
        )
        return
    properties = _dict(advertised.get("properties"))
    promised = {n for n in _list(advertised.get("required")) if isinstance(n, str)}
    wanted = _dict(expected.get("properties"))
    required = _list(expected.get("required"))
    for name in required:
        if not isinstance(name, str):
            continue
        if name not in properties:
            found.append(
                Reason(OUTPUT_FIELD_MISSING, pointer([*path, name]), f"the capability does not return {name!r}")
            )
        elif name not in promised:
            found.append(Reason(OUTPUT_FIELD_MISSING, pointer([*path, name]), f"the capability may leave out {name!r}"))
    for name, sub in wanted.items():
        if name in properties and isinstance(properties[name], dict):
            _compare(properties[name], sub, [*path, name], found)
    items, wanted_items = advertised.get("items"), expected.get("items")
    if isinstance(items, dict) and isinstance(wanted_items, dict):
        _compare(items, wanted_items, [*path, "0"], found)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
