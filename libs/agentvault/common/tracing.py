"""OpenTelemetry tracing: W3C trace context carried in gRPC metadata across every hop.

Spans are recorded only when OTEL_TRACES_EXPORTER=console (or a provider is installed by the embedding
program); otherwise the no-op tracer still propagates the caller's trace context unchanged.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

_configured = False
_recording = False
# With no tracer installed, spans are not worth their cost per call; the caller's W3C headers are carried
# through to outgoing calls unchanged instead, so a trace still spans every hop once someone records it.
_carried: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("carried_trace", default=())
TRACE_KEYS = ("traceparent", "tracestate")


def configure_tracing(service: str) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "console":
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        install(provider)


def install(provider: trace.TracerProvider) -> None:
    """Records spans through `provider` (an embedding program or a test may bring its own)."""
    global _recording
    trace.set_tracer_provider(provider)
    _recording = True


def recording() -> bool:
    return _recording


def carry(metadata: Iterable[tuple[str, str | bytes]] | None) -> contextvars.Token[tuple[tuple[str, str], ...]]:
    """Keeps the caller's trace headers for the outgoing calls made while handling this one."""
    found = tuple((k, v) for k, v in (metadata or ()) if k in TRACE_KEYS and isinstance(v, str) and len(v) <= 512)
    return _carried.set(found)


def release(token: contextvars.Token[tuple[tuple[str, str], ...]]) -> None:
    _carried.reset(token)


def tracer() -> trace.Tracer:
    return trace.get_tracer("agentvault")


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


def inject(carrier: dict[str, str]) -> Mapping[str, str]:
    if _recording:
        propagate.inject(carrier)
    else:
        carrier.update(_carried.get())
    return carrier
