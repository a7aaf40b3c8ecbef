"""A real OTLP trace receiver on loopback (gRPC and HTTP/protobuf), collecting every span the mesh exports."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tpb_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class Span:
    service: str
    mesh: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, str]
    links: tuple[str, ...] = ()  # the span ids this span links to


@dataclass
class Receiver:
    """Spans as received, from threads of its own (so a test's blocking mesh start never stalls an export)."""

    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    grpc_port: int = 0
    http_port: int = 0

    def take(self, request: tpb.ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    found.append(
                        Span(
                            service=resource.get("service.name", ""),
                            mesh=resource.get("mesh", ""),
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: a.value.string_value for a in s.attributes},
                            links=tuple(link.span_id.hex() for link in s.links),
                        )
                    )
        with self.lock:
            self.requests += 1
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
CONSUMER = trace_pb2.Span.SPAN_KIND_CONSUMER


class _TraceService(tpb_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: tpb.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> tpb.ExportTraceServiceResponse:
        self.receiver.take(request)
        return tpb.ExportTraceServiceResponse()


def _http_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_response(404)
                self.end_headers()
                return
            receiver.take(tpb.ExportTraceServiceRequest.FromString(body))
            answer = tpb.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def running() -> Iterator[Receiver]:
    """A receiver serving OTLP/gRPC and OTLP/HTTP until the generator is closed."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    tpb_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)
    receiver.grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(receiver))
    receiver.http_port = http.server_address[1]
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        http.shutdown()
        server.stop(0)
