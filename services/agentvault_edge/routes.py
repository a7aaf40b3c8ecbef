"""REST routes from the protos' google.api.http annotations: path templates, discovery and the route table."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import message, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from agentvault_edge.http_request import resolve_field_path
from agentvault_edge.transcode import FieldError

log = logging.getLogger(__name__)

_MODULE_NAME = re.compile(r"agentvault\.([a-z][a-z0-9_]*)\.v1\.([a-z][a-z0-9_]*_pb2)")
_SERVICE_PACKAGE = re.compile(r"agentvault\.([a-z][a-z0-9_]*)\.v1")
_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_LITERAL = re.compile(r"[^/{}*:=]+")
_ENCODED_SLASH = re.compile(r"(%2[fF])")
HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# Fields that hold a secret, even encrypted, and so must never be in an HTTP answer: an annotated RPC whose
# response could carry one is refused at start. Such RPCs are for the mesh's own services, over gRPC only.
_SECRET_FIELD = re.compile(r"encrypted_.*|.*_secret")
# Except a secret the call itself has just generated and returns this once (as CreateApiKey's token): an OAuth
# client's secret, issued by create and rotate. Only its hash is stored, so nothing else can ever return it.
_ISSUED_ONCE = frozenset(
    {
        "agentvault.identity.v1.CreateOAuthClientResponse.client_secret",
        "agentvault.identity.v1.RotateOAuthClientSecretResponse.client_secret",
    }
)


class TemplateError(ValueError):
    """An http annotation the edge cannot serve; raised at start so it is fixed before it ships."""


# ------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Segment:
    kind: Literal["literal", "star", "double_star"]
    text: str = ""


@dataclass(frozen=True)
class Variable:
    field_path: str
    start: int
    end: int


@dataclass(frozen=True)
class PathTemplate:
    """A parsed google.api.http path template (google/api/http.proto's grammar)."""

    source: str
    segments: tuple[Segment, ...]
    variables: tuple[Variable, ...]
    verb: str

    @property
    def specificity(self) -> tuple[bool, tuple[int, ...]]:
        # Compared lexicographically: a `:verb` beats none, then per segment literal > * > **.
        ranks = {"literal": 3, "star": 2, "double_star": 1}
        return (bool(self.verb), tuple(ranks[s.kind] for s in self.segments))

    @property
    def openapi_path(self) -> str:
        """The template with each variable written `{field.path}`, as OpenAPI path templating wants."""
        parts: list[str] = []
        i = 0
        starts = {v.start: v for v in self.variables}
        while i < len(self.segments):
            var = starts.get(i)
            if var is not None:
                parts.append("{" + var.field_path + "}")
                i = var.end
                continue
            seg = self.segments[i]
            parts.append(seg.text if seg.kind == "literal" else "*" if seg.kind == "star" else "**")
            i += 1
        return "/" + "/".join(parts) + (f":{self.verb}" if self.verb else "")

    def match(self, raw_segments: Sequence[str]) -> dict[str, str] | None:
        """Bindings of the variables for a path split on `/` (still percent-encoded), or None."""
        segments = list(raw_segments)
        if self.verb:
            suffix = ":" + self.verb
            if not segments or not segments[-1].endswith(suffix):
                return None
            segments[-1] = segments[-1][: -len(suffix)]
        count = len(self.segments)
        open_ended = count > 0 and self.segments[-1].kind == "double_star"
        if (open_ended and len(segments) < count - 1) or (not open_ended and len(segments) != count):
            return None
        for seg, raw in zip(self.segments, segments, strict=False):
            if seg.kind == "double_star":
                break
            if seg.kind == "literal":
                if unquote(raw) != seg.text:
                    return None
            elif raw == "":
                return None
        bindings: dict[str, str] = {}
        for var in self.variables:
            end = len(segments) if open_ended and var.end == count else var.end
            span = segments[var.start : end]
            if end - var.start == 1 and self.segments[var.start].kind == "star":
                # A single-segment variable decodes everything, %2F included (http.proto's rule).
                bindings[var.field_path] = unquote(span[0], errors="strict")
            else:
                bindings[var.field_path] = "/".join(_unquote_keep_slash(s) for s in span)
        return bindings


def _unquote_keep_slash(segment: str) -> str:
    # A multi-segment variable keeps %2F encoded, so that it stays distinguishable from a separator.
    return "".join(
        p if _ENCODED_SLASH.fullmatch(p) else unquote(p, errors="strict") for p in _ENCODED_SLASH.split(segment)
    )


def _split_top(text: str, sep: str) -> list[str]:
    """Splits on `sep` outside braces."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
            if depth > 1:
                raise TemplateError("nested variables are not allowed")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise TemplateError("unbalanced '}'")
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise TemplateError("unbalanced '{'")
    parts.append("".join(current))
    return parts


def _plain_segment(text: str) -> Segment:
    if text == "*":
        return Segment("star")
    if text == "**":
        return Segment("double_star")
    if not _LITERAL.fullmatch(text):
        raise TemplateError(f"invalid segment {text!r}")
    return Segment("literal", text)


def parse_template(source: str) -> PathTemplate:
    """Parses `/v1/{name=shelves/*}/books/{book.id}:verb` into segments, variables and verb."""
    try:
        return _parse_template(source)
    except TemplateError as exc:
        raise TemplateError(f"{source!r}: {exc}") from None


def _parse_template(source: str) -> PathTemplate:
    if not source.startswith("/"):
        raise TemplateError("must start with '/'")
    raw = _split_top(source[1:], "/")
    verb = ""
    last = _split_top(raw[-1], ":")
    if len(last) > 2:
        raise TemplateError("more than one ':' in the last segment")
    if len(last) == 2:
        raw[-1], verb = last
        if not _LITERAL.fullmatch(verb):
            raise TemplateError(f"invalid verb {verb!r}")
    segments: list[Segment] = []
    variables: list[Variable] = []
    for text in raw:
        if text.startswith("{"):
            if not text.endswith("}"):
                raise TemplateError(f"a variable must be a whole segment: {text!r}")
            name, eq, sub = text[1:-1].partition("=")
            if not _FIELD_PATH.fullmatch(name):
                raise TemplateError(f"invalid field path {name!r}")
            if any(v.field_path == name for v in variables):
                raise TemplateError(f"{name} is bound twice")
            inner = [_plain_segment(s) for s in sub.split("/")] if eq else [Segment("star")]
            start = len(segments)
            segments.extend(inner)
            variables.append(Variable(name, start, len(segments)))
        else:
            segments.append(_plain_segment(text))
    for i, seg in enumerate(segments):
        if seg.kind == "double_star" and i != len(segments) - 1:
            raise TemplateError("'**' must be the last segment")
    return PathTemplate(source, tuple(segments), tuple(variables), verb)


# ------------------------------------------------------------------------------------- route table


# The SSE resume convention (Route.sse_resume).
RESUME_REQUEST_FIELD, RESUME_EVENT_FIELD = "after_index", "index"


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str
    template: PathTemplate
    body: str
    response_body: str
    api: str
    service: ServiceDescriptor
    method: MethodDescriptor
    request_class: type[message.Message]
    response_class: type[message.Message]
    operation_id: str

    @property
    def grpc_path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def sse_resume(self) -> bool:
        """A server stream whose request has `after_index` and whose items have `index` is resumable: as SSE,
        each event's id is its item's index, and a reconnect's Last-Event-ID is the request's after_index."""
        return (
            self.server_streaming
            and RESUME_REQUEST_FIELD in self.request_class.DESCRIPTOR.fields_by_name
            and RESUME_EVENT_FIELD in self.response_class.DESCRIPTOR.fields_by_name
        )

    @property
    def client_streaming(self) -> bool:
        """Client or bidirectional streaming: served only as a WebSocket, one request message per text frame."""
        return bool(self.method.client_streaming)


@dataclass
class RouteMatch:
    route: Route
    bindings: dict[str, str]


@dataclass
class RouteTable:
    routes: list[Route] = field(default_factory=list)

    def match(self, http_method: str, raw_path: str) -> RouteMatch | list[str] | None:
        """The best route for the method; else the methods the path allows (for a 405); else None (404).

        Raises UnicodeDecodeError when a variable is not valid percent-encoded UTF-8.
        """
        segments = raw_path[1:].split("/") if raw_path.startswith("/") else [raw_path]
        matched = [(route, b) for route in self.routes if (b := route.template.match(segments)) is not None]
        # A path its `:verb` templates match is theirs alone: `/clients/x:disable` is not also the resource
        # `x:disable` of `/clients/{id}`, so neither another method's route nor Allow may name that one.
        if any(route.template.verb for route, _ in matched):
            matched = [(route, b) for route, b in matched if route.template.verb]
        best: RouteMatch | None = None
        allowed: set[str] = set()
        for route, bindings in matched:
            allowed.add(route.http_method)
            if route.http_method != http_method:
                continue
            if best is None or route.template.specificity > best.route.template.specificity:
                best = RouteMatch(route, bindings)
        if best is not None:
            return best
        return sorted(allowed) or None

    def backends(self) -> dict[str, list[str]]:
        """Service full names by api, for the readiness checks."""
        found: dict[str, list[str]] = {}
        for route in self.routes:
            names = found.setdefault(route.api, [])
            if route.service.full_name not in names:
                names.append(route.service.full_name)
        return found


def api_of(service: ServiceDescriptor) -> str | None:
    """`registry` for agentvault.registry.v1.X; None for a package outside the agentvault.<api>.v1 layout."""
    match = _SERVICE_PACKAGE.fullmatch(service.file.package)
    return match.group(1) if match else None


def _bindings(rule: http_pb2.HttpRule) -> Iterable[tuple[str, str, http_pb2.HttpRule]]:
    rules = [rule, *rule.additional_bindings]
    for r in rules:
        kind = r.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            yield r.custom.kind.upper(), r.custom.path, r
        else:
            yield kind.upper(), getattr(r, kind), r


def secret_fields(desc: Descriptor, seen: set[str] | None = None) -> list[str]:
    """Dotted paths of the secret-holding fields a message of this type can contain, at any depth."""
    seen = set() if seen is None else seen
    if desc.full_name in seen:
        return []
    seen.add(desc.full_name)
    found: list[str] = []
    for fd in desc.fields:
        # INPUT_ONLY fields (an agent's client_secret as its owner sends it) are never printed in an answer.
        input_only = field_behavior_pb2.INPUT_ONLY in fd.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if input_only:
            continue
        if _SECRET_FIELD.fullmatch(fd.name) and f"{desc.full_name}.{fd.name}" not in _ISSUED_ONCE:
            found.append(f"{desc.full_name}.{fd.name}")
        if fd.message_type is not None:
            found.extend(secret_fields(fd.message_type, seen))
    return found


def _check_route(route: Route) -> None:
    desc = route.method.input_type
    leaks = secret_fields(route.method.output_type)
    if leaks:
        raise TemplateError(
            f"{route.operation_id}: its response can carry {', '.join(leaks)}; an RPC that returns secrets "
            "must not have an HTTP route"
        )
    if route.client_streaming:
        _check_websocket_route(route)
    if route.body not in ("", "*") and route.body not in desc.fields_by_name:
        raise TemplateError(f"{route.operation_id}: body field {route.body!r} is not in {desc.full_name}")
    if route.response_body and route.response_body not in route.method.output_type.fields_by_name:
        raise TemplateError(f"{route.operation_id}: response_body {route.response_body!r} is not a response field")
    for var in route.template.variables:
        try:
            chain = resolve_field_path(desc, var.field_path, for_query=False)
        except FieldError as exc:
            raise TemplateError(f"{route.operation_id}: path variable {exc}") from None
        if ".".join(fd.name for fd in chain) != var.field_path:
            raise TemplateError(f"{route.operation_id}: path variable {var.field_path} must use proto field names")


def _check_websocket_route(route: Route) -> None:
    # The requests of a client-streaming RPC are the WebSocket's text frames, each a whole message; a WebSocket
    # opens with a GET, and there is no one request for a path variable or a body to fill.
    if route.http_method != "GET":
        raise TemplateError(f"{route.operation_id}: a client-streaming RPC is a WebSocket and must be bound to get")
    if route.template.variables or route.body:
        raise TemplateError(
            f"{route.operation_id}: a client-streaming RPC takes its requests as WebSocket frames, so its binding "
            "can have neither path variables nor a body"
        )


def build_routes(services: Iterable[ServiceDescriptor]) -> RouteTable:
    """Every annotated method of `services`; a malformed annotation raises TemplateError."""
    table = RouteTable()
    seen: dict[tuple[str, str], str] = {}
    for service in services:
        api = api_of(service)
        if api is None:
            log.warning("skipping %s: not in an agentvault.<api>.v1 package", service.full_name)
            continue
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for n, (verb, path, binding) in enumerate(_bindings(rule)):
                template = parse_template(path)
                route = Route(
                    http_method=verb,
                    template=template,
                    body=binding.body,
                    response_body=binding.response_body,
                    api=api,
                    service=service,
                    method=method,
                    request_class=message_factory.GetMessageClass(method.input_type),
                    response_class=message_factory.GetMessageClass(method.output_type),
                    operation_id=f"{service.name}_{method.name}" + (f"_{n}" if n else ""),
                )
                _check_route(route)
                key = (verb, template.openapi_path)
                if key in seen:
                    raise TemplateError(f"{verb} {path} is bound by both {seen[key]} and {route.operation_id}")
                seen[key] = route.operation_id
                table.routes.append(route)
    return table


def discover_services() -> list[ServiceDescriptor]:
    """The services of every generated `agentvault.<api>.v1.*_pb2` module installed beside this package."""
    import agentvault

    names: set[str] = set()
    for base in agentvault.__path__:
        root = Path(base)
        if not root.is_dir():
            continue
        # The agentvault.<api> and .v1 packages are namespace packages (no __init__.py), which
        # pkgutil.walk_packages does not descend into; list the directories and let pkgutil list modules.
        for api_dir in sorted(p for p in root.iterdir() if (p / "v1").is_dir()):
            for info in pkgutil.iter_modules([str(api_dir / "v1")]):
                name = f"agentvault.{api_dir.name}.v1.{info.name}"
                if _MODULE_NAME.fullmatch(name):
                    names.add(name)
    services: list[ServiceDescriptor] = []
    for name in sorted(names):
        module = importlib.import_module(name)
        services.extend(module.DESCRIPTOR.services_by_name.values())
    return services
