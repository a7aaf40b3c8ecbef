"""OpenTelemetry tracing: W3C trace context carried in gRPC metadata across every hop.

Spans are recorded only when OTEL_TRACES_EXPORTER=console (or a provider is installed by the embedding
program); otherwise the no-op tracer still propagates the caller's trace context unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

_configured = False


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
        trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer("agentvault")


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


def inject(carrier: dict[str, str]) -> Mapping[str, str]:
    propagate.inject(carrier)
    return carrier
