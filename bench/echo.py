"""The ceiling: a bare grpc.aio unary echo server (no interceptors, no database) on the registry's event loop.

Run as `python -m bench.echo PORT`. It parses the request proto and serializes it back, like any real handler
must, and does nothing else; whatever a registry call costs beyond this is the registry's own.

`python -m bench.echo PORT --durable DSN` is the floor of a durable send (bench/messaging_bench.py): the same bare
server whose handler parses a SendMessageRequest and commits its message, as bytes, in one row of an indexed table
(asyncpg, one INSERT per call: the least any service must do before it answers "stored") and answers with the row's
id. Whatever a SendMessage costs beyond this is the messaging service's own (policy, authentication, routing...).
"""

from __future__ import annotations

import sys
import uuid
from typing import Any, cast

import asyncpg
import grpc

from agentvault.messaging.v1.messaging_service_pb2 import SendMessageRequest
from agentvault.registry.v1.registry_service_pb2 import GetAgentRequest
from bench.procs import run_loop

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"
DURABLE_METHOD = f"/{SERVICE}/Store"
DURABLE_TABLE = """CREATE TABLE IF NOT EXISTS bench_durable (
    id uuid PRIMARY KEY, inbox text NOT NULL, body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"""
DURABLE_INDEX = "CREATE INDEX IF NOT EXISTS bench_durable_inbox ON bench_durable (inbox, created_at)"


async def echo(request: GetAgentRequest, context: grpc.aio.ServicerContext) -> GetAgentRequest:
    return request


async def serve(port: int, dsn: str = "") -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=GetAgentRequest.FromString, response_serializer=GetAgentRequest.SerializeToString
    )
    handlers: dict[str, grpc.RpcMethodHandler] = {"Echo": handler}
    if dsn:
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=16)
        await pool.execute(DURABLE_TABLE)
        await pool.execute(DURABLE_INDEX)

        async def store(request: SendMessageRequest, context: grpc.aio.ServicerContext) -> GetAgentRequest:
            row_id = uuid.uuid4()
            await pool.execute(
                "INSERT INTO bench_durable (id, inbox, body) VALUES ($1, $2, $3)",
                row_id,
                "agent:" + request.message.recipient.agent_id,
                request.message.SerializeToString(),
            )
            return GetAgentRequest(id=str(row_id))

        handlers["Store"] = grpc.unary_unary_rpc_method_handler(
            cast(Any, store),
            request_deserializer=SendMessageRequest.FromString,
            response_serializer=GetAgentRequest.SerializeToString,
        )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"echo: cannot bind 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    port = int(sys.argv[1])
    dsn = sys.argv[3] if sys.argv[2:3] == ["--durable"] else ""
    run_loop(serve(port, dsn))


if __name__ == "__main__":
    main()
