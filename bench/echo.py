"""The ceiling: a bare grpc.aio unary echo server (no interceptors, no database) on the registry's event loop.

Run as `python -m bench.echo PORT`. It parses the request proto and serializes it back, like any real handler
must, and does nothing else; whatever a registry call costs beyond this is the registry's own.
"""

from __future__ import annotations

import sys

import grpc

from agentvault.registry.v1.registry_service_pb2 import GetAgentRequest
from bench.procs import run_loop

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def echo(request: GetAgentRequest, context: grpc.aio.ServicerContext) -> GetAgentRequest:
    return request


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=GetAgentRequest.FromString, response_serializer=GetAgentRequest.SerializeToString
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler})])
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"echo: cannot bind 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    port = int(sys.argv[1])
    run_loop(serve(port))


if __name__ == "__main__":
    main()
