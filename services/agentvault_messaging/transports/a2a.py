"""Delivery to A2A agents with the a2a-sdk client: A2A 1.0 JSON-RPC, and 0.3 through the SDK's compat client."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit

import httpcore
import httpx
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.errors import A2AClientTimeoutError
from a2a.types import a2a_pb2 as a2a
from a2a.utils import errors as a2a_errors
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, VERSION_HEADER, TransportProtocol

from agentvault.common import a2a_map, egress, tracing
from agentvault.common.errors import Unavailable
from agentvault.common.lru import Lru

from .base import DELIVERED, DeliveryError, Outbound, Outcome, TransportContext, status_error

log = logging.getLogger(__name__)

# Endpoints whose protocol version and streaming support were found, so that only the first delivery to an
# agent pays for finding them: bounded in bytes (the key is a registered URL, at most 2048 characters).
MODES_SIZE = 10_000
MODES_BUDGET = 8 * 1024 * 1024
MAX_ERROR_TEXT = 200
MAX_ANNOTATION = 256
# Pooled connections to agents: enough for the delivery worker's concurrency, idle ones closed soon.
# GetTask polling of a task an agent without streaming is still working on: the first pause, doubled up to the
# last (the delivery's deadline bounds the whole).
POLL_FIRST = 0.05
POLL_MAX = 1.0
LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=50, keepalive_expiry=30.0)

# A2A errors that say the request itself is wrong for this agent: sending it again cannot help.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    a2a_errors.InvalidParamsError,
    a2a_errors.InvalidRequestError,
    a2a_errors.MethodNotFoundError,
    a2a_errors.JSONParseError,
    a2a_errors.ContentTypeNotSupportedError,
    a2a_errors.UnsupportedOperationError,
    a2a_errors.VersionNotSupportedError,
    a2a_errors.ExtensionSupportRequiredError,
    a2a_errors.TaskNotFoundError,
    a2a_errors.TaskNotCancelableError,
    a2a_errors.PushNotificationNotSupportedError,
)

# The most answer bytes the current delivery may read (the context's max_answer_bytes): set per delivery, read
# by the HTTP transport below as the SDK reads the answer in the same task.
_answer_limit: contextvars.ContextVar[int] = contextvars.ContextVar("a2a_answer_limit", default=1024 * 1024)


@dataclass(frozen=True)
class Mode:
    """How to speak to one endpoint: the A2A protocol version and whether it streams."""

    version: str = PROTOCOL_VERSION_1_0
    streaming: bool = True


class A2ATransport:
    """Sends each message as an A2A SendStreamingMessage (SendMessage to agents that do not stream) and follows
    the task until it ends, waits for input, or the deadline passes.

    Streaming, because the first event names the task: a task still working at the deadline is then DELIVERED
    with its id (the mesh may look at it later), where a blocking SendMessage cut off by the deadline leaves
    nothing to point at; an agent that does not stream is likewise answered at once with the task, then polled
    with GetTask until it ends or the deadline passes. The first delivery to an endpoint finds its mode: a 1.0
    agent that does not stream answers UnsupportedOperation and gets SendMessage (then GetTask); a 0.3 agent does
    not know the 1.0 method (MethodNotFound) and gets the SDK's 0.3 compat client. Those refusals come before the
    agent did anything, so trying the next mode is safe."""

    name: ClassVar[str] = "a2a"
    protocols: ClassVar[tuple[str, ...]] = ("a2a",)
    priority: ClassVar[int] = 10

    def __init__(self) -> None:
        # One pooled client per egress setting (the mesh has one); agents with their own TLS context (mTLS, own
        # CA) get a client per delivery, since httpx fixes TLS per client.
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._modes: Lru[str, Mode] = Lru(MODES_SIZE, budget=MODES_BUDGET, weigh=lambda _: 0)

    async def deliver(self, item: Outbound, context: TransportContext) -> Outcome:
        if urlsplit(item.endpoint).scheme not in ("http", "https"):
            raise DeliveryError("the A2A endpoint URL must be http or https", permanent=True)
        try:
            egress.check_url(item.endpoint, context.block_private)
        except egress.EgressRefused as exc:
            raise DeliveryError(f"endpoint refused: {exc}", permanent=True) from None
        limit = _answer_limit.set(context.max_answer_bytes)
        own_client = context.auth.ssl_context is not None
        http = _client(context.block_private, context.auth.ssl_context) if own_client else self._client(context)
        loop = asyncio.get_running_loop()
        end = loop.time() + item.deadline
        answer = _Answer()
        try:
            async with asyncio.timeout(item.deadline):
                headers, token = await context.auth.request_headers()
                if tracing.recording():  # the delivery span's traceparent, sent as HTTP headers with each call
                    headers = {**headers, **tracing.current_headers()}
                await self._send(item, http, headers, token, context, answer, end)
        except TimeoutError:
            if answer.task is not None:
                return _outcome(item.message, answer.task, timed_out=True)
            raise DeliveryError(f"no answer from the agent within {item.deadline:g}s") from None
        except Unavailable as exc:  # no OAuth token, no client certificate: may come back
            raise DeliveryError(f"auth: {exc.message[:MAX_ERROR_TEXT]}") from None
        finally:
            _answer_limit.reset(limit)
            if own_client:
                await http.aclose()
        if answer.message is not None:
            replies = a2a_map.answer_replies(item.message, answer.message)
            annotations = {"a2a.replies_dropped": str(replies.dropped)} if replies.dropped else {}
            return Outcome(a2a_map.ACKNOWLEDGED, "A2A message answer", tuple(replies.messages), annotations)
        if answer.task is None:
            raise DeliveryError("the agent's answer has neither a task nor a message")
        return _outcome(item.message, answer.task, timed_out=False)

    async def _send(
        self,
        item: Outbound,
        http: httpx.AsyncClient,
        headers: dict[str, str],
        token: str | None,
        context: TransportContext,
        answer: _Answer,
        end: float,
    ) -> None:
        mode = self._modes.get(item.endpoint) or Mode()
        message = a2a_map.to_a2a(item.message)
        tried: set[Mode] = set()
        while True:
            tried.add(mode)
            try:
                await _exchange(http, item.endpoint, mode, message, headers, answer, end)
            except (a2a_errors.MethodNotFoundError, a2a_errors.VersionNotSupportedError) as exc:
                # The other version: 0.3 for an agent that does not know 1.0, and back to 1.0 for an agent
                # remembered as 0.3 that has moved on.
                other = PROTOCOL_VERSION_0_3 if mode.version == PROTOCOL_VERSION_1_0 else PROTOCOL_VERSION_1_0
                fallback = Mode(other, mode.streaming)
                if answer.started or fallback in tried:
                    raise _delivery_error(exc, context, token) from None
                mode = fallback
            except a2a_errors.UnsupportedOperationError as exc:
                fallback = Mode(mode.version, streaming=False)
                if answer.started or not mode.streaming or fallback in tried:
                    raise _delivery_error(exc, context, token) from None
                mode = fallback
            except (TimeoutError, asyncio.CancelledError):
                raise
            except Exception as exc:
                raise _delivery_error(exc, context, token) from None
            else:
                self._modes.put(item.endpoint, mode, len(item.endpoint))
                return

    def _client(self, context: TransportContext) -> httpx.AsyncClient:
        client = self._clients.get(context.block_private)
        if client is None or client.is_closed:
            client = self._clients[context.block_private] = _client(context.block_private, None)
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


class _Answer:
    """What the agent answered so far: a Message, or a task put together from its events."""

    def __init__(self) -> None:
        self.message: a2a.Message | None = None
        self.task: a2a.Task | None = None

    @property
    def started(self) -> bool:
        return self.message is not None or self.task is not None

    def add(self, event: a2a.StreamResponse) -> bool:
        """Takes one event; True when nothing more is worth waiting for."""
        kind = event.WhichOneof("payload")
        if kind == "message":
            self.message = event.message
            return True
        if kind == "task":
            self.task = event.task
        elif kind == "status_update":
            task = self._task(event.status_update.task_id, event.status_update.context_id)
            task.status.CopyFrom(event.status_update.status)
        elif kind == "artifact_update":
            update = event.artifact_update
            task = self._task(update.task_id, update.context_id)
            known = next((a for a in task.artifacts if a.artifact_id == update.artifact.artifact_id), None)
            if known is not None and update.append:
                known.parts.extend(update.artifact.parts)
            elif known is not None:
                known.CopyFrom(update.artifact)
            else:
                task.artifacts.append(update.artifact)
        return self.task is not None and self.task.status.state in a2a_map.FINAL_STATES

    def _task(self, task_id: str, context_id: str) -> a2a.Task:
        if self.task is None:
            self.task = a2a.Task(id=task_id, context_id=context_id)
        return self.task


async def _exchange(
    http: httpx.AsyncClient,
    endpoint: str,
    mode: Mode,
    message: a2a.Message,
    headers: dict[str, str],
    answer: _Answer,
    end: float,
) -> None:
    """One send in `mode`. A stream is followed to its end. Without streaming the send returns at once with the
    task (return_immediately), which is then polled with GetTask: a blocking SendMessage cut off by the deadline
    would leave no task id, and the next attempt would send the message again as a new task."""
    request = a2a.SendMessageRequest(
        message=message, configuration=a2a.SendMessageConfiguration(return_immediately=not mode.streaming)
    )
    card = a2a.AgentCard(
        supported_interfaces=[
            a2a.AgentInterface(url=endpoint, protocol_binding=TransportProtocol.JSONRPC, protocol_version=mode.version)
        ],
        capabilities=a2a.AgentCapabilities(streaming=mode.streaming),
    )
    client = ClientFactory(ClientConfig(httpx_client=http, streaming=mode.streaming)).create(card)
    # A second beyond the deadline: the deadline itself (asyncio.timeout in deliver) must end the wait, keeping
    # the task id learnt so far, not httpx's own timeout.
    remaining = max(end - asyncio.get_running_loop().time(), 0.0) + 1.0
    call = ClientCallContext(service_parameters={**headers, VERSION_HEADER: mode.version}, timeout=remaining)
    stream = cast(AsyncGenerator[a2a.StreamResponse, None], client.send_message(request, context=call))
    try:
        async with contextlib.aclosing(stream):
            async for event in stream:
                if answer.add(event):
                    return
        if mode.streaming or answer.task is None or not answer.task.id:
            return
        # Not streaming: the task as it was when the send returned; followed until it ends or waits for input,
        # or the deadline (asyncio.timeout in deliver) ends the wait with its id kept.
        pause = POLL_FIRST
        while answer.task.status.state not in a2a_map.FINAL_STATES:
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL_MAX)
            task = await client.get_task(a2a.GetTaskRequest(id=answer.task.id), context=call)
            answer.task = task
    finally:
        await client.close()


def _outcome(original: Any, task: a2a.Task, *, timed_out: bool) -> Outcome:
    annotations = {"a2a.task_id": task.id[:MAX_ANNOTATION]} if task.id else {}
    if task.context_id:
        annotations["a2a.context_id"] = task.context_id[:MAX_ANNOTATION]
    if timed_out:
        return Outcome(DELIVERED, "A2A task still working at the deadline", (), annotations)
    replies = a2a_map.answer_replies(original, task)
    if replies.dropped:
        annotations["a2a.replies_dropped"] = str(replies.dropped)
    return Outcome(a2a_map.status_of(task), a2a_map.reason_of(task), tuple(replies.messages), annotations)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__
    return chain


def _delivery_error(exc: Exception, context: TransportContext, token: str | None) -> DeliveryError:
    """The attempt's failure, told without the agent's full answer or the endpoint's URL (it may carry secrets)."""
    chain = _causes(exc)
    for cause in chain:
        if isinstance(cause, _AnswerTooLarge):
            return DeliveryError(f"the agent's answer is larger than {_answer_limit.get()} bytes", permanent=True)
        if isinstance(cause, _EgressBlocked):
            return DeliveryError(f"endpoint refused: {cause}", permanent=True)
    for cause in chain:
        if isinstance(cause, httpx.HTTPStatusError):
            return _status_error(cause.response, context, token)
        if isinstance(cause, httpx.TimeoutException | A2AClientTimeoutError):
            return DeliveryError("the agent did not answer in time")
        if isinstance(cause, httpx.ConnectError):
            return DeliveryError("cannot connect to the agent")
        if isinstance(cause, httpx.RequestError):
            return DeliveryError(f"connection to the agent failed: {type(cause).__name__}")
    if isinstance(exc, PERMANENT_ERRORS):
        return DeliveryError(f"A2A error {type(exc).__name__}: {_text(exc)}", permanent=True)
    if isinstance(exc, a2a_errors.A2AError):
        # The agent's own failure (InternalError), or an answer that is not JSON-RPC: it may do better later.
        return DeliveryError(f"A2A error {type(exc).__name__}: {_text(exc)}")
    log.warning("A2A delivery failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
    return DeliveryError(f"A2A delivery failed: {type(exc).__name__}")


def _status_error(response: httpx.Response, context: TransportContext, token: str | None) -> DeliveryError:
    status = response.status_code
    if status == 401 and context.auth.source is not None and token is not None:
        # An expired or revoked access token: the next attempt fetches a fresh one.
        context.auth.source.invalidate(token)
        return DeliveryError("HTTP 401: the agent refused the access token")
    return status_error(status, response.headers.get("Retry-After"))


def _text(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return " ".join(str(text).split())[:MAX_ERROR_TEXT]


class _AnswerTooLarge(httpx.ReadError):
    """The agent's answer went past the delivery's max_answer_bytes."""


class _EgressBlocked(httpcore.ConnectError):
    """The endpoint's name resolves only to addresses the mesh may not call."""


class _LimitedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self.inner = inner
        self.limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self.inner:
            read += len(chunk)
            if read > self.limit:
                raise _AnswerTooLarge(f"answer larger than {self.limit} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the egress rules allow, checking what a name resolves to at connect time (as
    the mesh's aiohttp sessions do), so a name that moves to a private address (DNS rebinding) is caught."""

    def __init__(self, block_private: bool) -> None:
        self.block_private = block_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            allowed = await egress.allowed_addresses(host, port, self.block_private)
        except egress.EgressRefused as exc:
            raise _EgressBlocked(exc.reason) from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve the agent's host: {exc.strerror or exc}") from None
        error: Exception | None = None
        for address in allowed:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not agent endpoints")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over the guarded backend, reading at most the delivery's max_answer_bytes."""

    def __init__(self, block_private: bool, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False, limits=LIMITS)
        # httpx takes no network backend: its pool is built again, as httpx builds it, with the guarded one.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=LIMITS.max_connections,
            max_keepalive_connections=LIMITS.max_keepalive_connections,
            keepalive_expiry=LIMITS.keepalive_expiry,
            network_backend=_GuardedBackend(block_private),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_LimitedStream(response.stream, _answer_limit.get()),
            extensions=response.extensions,
        )


def _client(block_private: bool, ssl_context: ssl.SSLContext | None) -> httpx.AsyncClient:
    # The system's trust roots unless the agent's registration brings its own (as the mesh's aiohttp session).
    transport = _GuardedTransport(block_private, ssl_context or ssl.create_default_context())
    # No redirects: the credentials are for this address only. No proxies from the environment: the egress
    # check must see the real destination.
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)


TRANSPORT = A2ATransport
