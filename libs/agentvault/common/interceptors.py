"""What every RPC gets: request ids, structured logs, Prometheus metrics, tracing and error mapping.

Handlers are wrapped once, when a service is registered, rather than through grpc.aio's interceptor chain,
which is awaited on every call; the per-call cost is one extra coroutine frame.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace

from agentvault.common import errors, tracing
from agentvault.common.auth import AUTHORIZATION_KEY
from agentvault.common.logs import request_id_var
from agentvault.common.metrics import GRPC_HANDLED, GRPC_LATENCY

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128


def metadata_value(metadata: Any, key: str) -> str:
    """The first text value of `key` in gRPC metadata, or ""."""
    for k, v in metadata or ():
        if k == key and isinstance(v, str):
            return v
    return ""


# Generated ids are a random per-process prefix and a counter: unique, and no system call per request.
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count(1)


def _request_id(metadata: Any) -> str:
    rid = metadata_value(metadata, REQUEST_ID_KEY)
    if rid and len(rid) <= _MAX_REQUEST_ID and rid.isprintable():
        return rid
    return f"{_ID_PREFIX}{next(_ids):010x}"


def _error_for(exc: BaseException, method: str) -> errors.AgentVaultError:
    """The status a handler's exception becomes (logged when it is unexpected)."""
    if isinstance(exc, errors.AgentVaultError):
        return exc
    err = errors.from_store_error(exc)
    if err is None:
        log.exception("unhandled error in %s", method)
        return errors.AgentVaultError(
            f"internal error (request id {request_id_var.get()})", "INTERNAL", {}, grpc.StatusCode.INTERNAL
        )
    log.warning("%s: %s mapped to %s", method, type(exc).__name__, err.code.name)
    return err


def instrument(method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """Wraps one method handler with request ids, metrics, tracing and error mapping.

    Applied once when a service is registered (GrpcServer.add), so a call pays for one extra coroutine
    frame and nothing else: no interceptor lookup per call.
    """
    _, _, tail = method.partition("/")
    service, _, name = tail.partition("/")
    latency = GRPC_LATENCY.labels(service, name)
    handled_ok = GRPC_HANDLED.labels(service, name, "OK")
    tracer = tracing.tracer()

    def finish(code: str, start: float) -> None:
        latency.observe(time.perf_counter() - start)
        (handled_ok if code == "OK" else GRPC_HANDLED.labels(service, name, code)).inc()

    def span(metadata: Any) -> Any:
        if not tracing.recording():
            return contextlib.nullcontext()
        return tracer.start_as_current_span(method, context=tracing.extract(metadata), kind=trace.SpanKind.SERVER)

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            md = context.invocation_metadata()
            token = request_id_var.set(_request_id(md))
            carried = tracing.carry(md)
            start = time.perf_counter()
            code = "OK"
            try:
                with span(md):
                    return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except Exception as exc:
                err = _error_for(exc, method)
                # Named before aborting: abort_with_status raises, and the call must be counted with its code.
                code = err.code.name
                await context.abort_with_status(err.to_status())
            finally:
                finish(code, start)
                tracing.release(carried)
                request_id_var.reset(token)

        return call

    def streaming(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            md = context.invocation_metadata()
            token = request_id_var.set(_request_id(md))
            carried = tracing.carry(md)
            start = time.perf_counter()
            code = "OK"
            try:
                with span(md):
                    if inspect.isasyncgenfunction(behavior):
                        async for item in behavior(request, context):
                            yield item
                    else:
                        await behavior(request, context)
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except Exception as exc:
                err = _error_for(exc, method)
                # Named before aborting: abort_with_status raises, and the call must be counted with its code.
                code = err.code.name
                await context.abort_with_status(err.to_status())
            finally:
                finish(code, start)
                tracing.release(carried)
                request_id_var.reset(token)

        return call

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


def outgoing_metadata(extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Metadata for a call made while handling another: the request id and trace context travel on."""
    md: list[tuple[str, str]] = list(extra or ())
    rid = request_id_var.get()
    if rid and not any(k == REQUEST_ID_KEY for k, _ in md):
        md.append((REQUEST_ID_KEY, rid))
    carrier: dict[str, str] = {}
    tracing.inject(carrier)
    md.extend(carrier.items())
    return md


def caller_metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    """The caller's own credential (and the request id and trace context), for a call made on its behalf: the
    registry then applies its visibility rules to the caller, not to the service forwarding it."""
    forwarded = [
        (k, v) for k, v in context.invocation_metadata() or () if k == AUTHORIZATION_KEY and isinstance(v, str)
    ]
    return outgoing_metadata(forwarded[:1])
