"""OpenTelemetry tracing: W3C trace context carried in gRPC metadata (and federation HTTP headers) across every hop.

Spans are recorded when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, exported over
OTLP in batches, or with OTEL_TRACES_EXPORTER=console, or when the embedding program installs a provider; otherwise
the no-op tracer still propagates the caller's trace context unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

log = logging.getLogger(__name__)

_configured = False
_recording = False
# With no tracer installed, spans are not worth their cost per call; the caller's W3C headers are carried
# through to outgoing calls unchanged instead, so a trace still spans every hop once someone records it.
_carried: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("carried_trace", default=())
TRACE_KEYS = ("traceparent", "tracestate")
_MAX_HEADER = 512


def _otlp_exporter() -> Any:
    """The OTLP span exporter the standard variables ask for (None for an unknown protocol); it reads its
    endpoint, headers, TLS and timeout from the environment itself (OTEL_EXPORTER_OTLP_[TRACES_]*)."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    log.error("OTEL_EXPORTER_OTLP_PROTOCOL %r is not supported (grpc or http/protobuf): no spans exported", protocol)
    return None


def configure_tracing(service: str) -> None:
    """Installs a recording provider when the environment asks for one; `service` is the default service.name
    (OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, read by the SDK, win)."""
    global _configured
    if _configured:
        return
    _configured = True
    exporter_names = {n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()}
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or "none" in exporter_names:
        return
    # As the SDK reads OTEL_TRACES_EXPORTER (otlp, console); unset, an OTLP endpoint alone turns export on.
    otlp = "otlp" in exporter_names or (
        not exporter_names
        and bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    )
    console = "console" in exporter_names
    exporter = _otlp_exporter() if otlp else None
    otlp = exporter is not None
    if not (otlp or console):
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    named = bool(os.environ.get("OTEL_SERVICE_NAME")) or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service}))
    if exporter is not None:
        # Batched (OTEL_BSP_* tune it) so a request never waits on the collector; what is still batched when the
        # process ends is exported by the provider's shutdown, which the SDK runs at exit.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    install(provider)
    log.info("tracing: recording spans (%s)", ", ".join(n for n, on in (("otlp", otlp), ("console", console)) if on))


def install(provider: trace.TracerProvider) -> None:
    """Records spans through `provider` (an embedding program or a test may bring its own)."""
    global _recording
    trace.set_tracer_provider(provider)
    _recording = True


def recording() -> bool:
    return _recording


def carry(metadata: Iterable[tuple[str, str | bytes]] | None) -> contextvars.Token[tuple[tuple[str, str], ...]]:
    """Keeps the caller's trace headers for the outgoing calls made while handling this one."""
    found = tuple(
        (k, v) for k, v in (metadata or ()) if k in TRACE_KEYS and isinstance(v, str) and len(v) <= _MAX_HEADER
    )
    return _carried.set(found)


def release(token: contextvars.Token[tuple[tuple[str, str], ...]]) -> None:
    _carried.reset(token)


def tracer() -> trace.Tracer:
    return trace.get_tracer("agentvault")


def extract(metadata: Iterable[tuple[str, str | bytes]] | Mapping[str, str] | None) -> Context:
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    carrier = {k.lower(): v for k, v in items if isinstance(v, str) and len(v) <= _MAX_HEADER}
    return propagate.extract(carrier)


def inject(carrier: dict[str, str]) -> dict[str, str]:
    if _recording:
        propagate.inject(carrier)
    else:
        carrier.update(_carried.get())
    return carrier


def traceparent() -> str:
    """The current trace context as one W3C traceparent value ("" outside a trace), e.g. to store with a message
    so the work it starts later joins the same trace."""
    value = inject({}).get("traceparent", "")
    # A W3C traceparent is 55 characters; anything carried from a caller that does not fit is not kept.
    return value if len(value) <= 64 else ""


_NO_HEADERS: dict[str, str] = {}


def current_headers() -> Mapping[str, str]:
    """The current span's W3C trace headers for a call this process makes on its own account (a push to an agent),
    when spans are recorded; empty otherwise (nothing is paid per call, and no caller's headers are passed on)."""
    if not _recording:
        return _NO_HEADERS
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def mark(name: str, kind: trace.SpanKind, traceparent: str, attributes: Mapping[str, str] | None = None) -> None:
    """A span of no duration for one event of the trace `traceparent` names (the current one when empty), e.g. a
    stored message handed to a receiver, linked to the current span (the call that handed it over); nothing when
    spans are not recorded."""
    if not _recording:
        return
    current = trace.get_current_span().get_span_context()
    context = extract({"traceparent": traceparent}) if traceparent else None
    links = [trace.Link(current)] if traceparent and current.is_valid else None
    tracer().start_span(name, context=context, kind=kind, attributes=attributes, links=links).end()


def replace_trace_headers(metadata: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`metadata` with the caller's trace headers replaced by the current span's (when spans are recorded), so
    the next hop's span is a child of this process's span rather than of the caller's."""
    if not _recording:
        return metadata
    kept = [(k, v) for k, v in metadata if k not in TRACE_KEYS]
    kept.extend(inject({}).items())
    return kept


_NOTHING = contextlib.nullcontext()


def span(
    name: str,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    parent: Iterable[tuple[str, str | bytes]] | Mapping[str, str] | None = None,
    attributes: Mapping[str, str] | None = None,
) -> contextlib.AbstractContextManager[Any]:
    """A span around a block when spans are recorded (a shared no-op context otherwise: nothing made per call);
    `parent` is trace headers to continue (default: the current context)."""
    if not _recording:
        return _NOTHING
    context = extract(parent) if parent is not None else None
    return tracer().start_as_current_span(name, context=context, kind=kind, attributes=attributes)


def incoming(
    name: str, headers: Iterable[tuple[str, str | bytes]] | Mapping[str, str] | None, **attributes: str
) -> contextlib.AbstractContextManager[Any]:
    """A SERVER span for a request received with `headers` (its traceparent, if any, is the parent)."""
    return span(name, trace.SpanKind.SERVER, headers if headers is not None else {}, attributes)


CLIENT = trace.SpanKind.CLIENT
SERVER = trace.SpanKind.SERVER
CONSUMER = trace.SpanKind.CONSUMER
