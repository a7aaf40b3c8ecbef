"""GrpcClient: the channel, credential, retry policy, deadlines and typed errors every AgentVault client shares.

Idempotent reads are retried on UNAVAILABLE by gRPC itself, from the retry policy in the channel's service
config (gRFC A6: exponential backoff with full jitter, at most 5 attempts, all within the call's deadline).
Writes are never retried: a create whose reply was lost could otherwise happen twice.
"""

# `timeout` is a gRPC deadline, sent to the server and covering retries, which asyncio.timeout is not.

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import grpc
from google.protobuf.message import Message

from agentvault.client.errors import ClientError, from_rpc_error
from agentvault.common.interceptors import REQUEST_ID_KEY, outgoing_metadata
from agentvault.common.settings import Env

TOKEN_ENV = "AGENTVAULT_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_TIMEOUT = 10.0

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Stub = TypeVar("Stub")
Page = TypeVar("Page", bound=Message)


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retry policy for the idempotent methods. gRPC caps max_attempts at 5 and waits a random time in
    [0, min(initial_backoff * multiplier**(n-1), max_backoff)] before attempt n+1."""

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 4.0
    multiplier: float = 2.0

    def service_config(self, methods: Sequence[tuple[str, str]]) -> str:
        """The channel's service config retrying `methods`, given as (full service name, method name)."""
        return json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": service, "method": method} for service, method in methods],
                        "retryPolicy": {
                            "maxAttempts": self.max_attempts,
                            "initialBackoff": f"{self.initial_backoff:.3f}s",
                            "maxBackoff": f"{self.max_backoff:.3f}s",
                            "backoffMultiplier": self.multiplier,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ]
            }
        )


async def pages(fetch: Callable[[str], Awaitable[Page]]) -> AsyncIterator[Page]:
    """Every page of a list, `fetch(page_token)` called for the next one as the previous one is consumed."""
    token = ""
    while True:
        page = await fetch(token)
        yield page
        token = page.next_page_token  # type: ignore[attr-defined]
        if not token:
            return


class GrpcClient:
    """Calls one AgentVault service. Use as `async with Client() as client:` or call `close()` when done.

    address: HOST:PORT; default $<ADDRESS_ENV>, else 127.0.0.1:$<PORT_ENV>.
    token: bearer credential; default AGENTVAULT_TOKEN; "" sends none.
    timeout: default deadline of each call in seconds, retries included; every method can override it.
    root_certificates: PEM roots; with them (or tls=True, which uses the system roots) the channel uses TLS.
    retry: policy for idempotent calls; None disables retries.
    """

    # Set by each subclass: what the service is called in messages, where its address comes from, and which of
    # its methods are safe to repeat (reading twice has the same effect as reading once).
    SERVICE_LABEL: ClassVar[str] = "server"
    ADDRESS_ENV: ClassVar[str] = ""
    PORT_ENV: ClassVar[str] = ""
    IDEMPOTENT: ClassVar[Sequence[tuple[str, str]]] = ()

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        root_certificates: bytes | None = None,
        tls: bool = False,
        retry: RetryPolicy | None = RetryPolicy(),  # frozen, so sharing the default is safe
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address or Env().addr(self.ADDRESS_ENV, self.PORT_ENV)
        self.timeout = timeout
        self._token = os.environ.get(TOKEN_ENV, "") if token is None else token
        channel_options: list[tuple[str, Any]] = [
            # Reconnect soon after a restart instead of backing off towards gRPC's default 120 s, so that
            # retry attempts find the server again within a call's deadline.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if retry is not None and self.IDEMPOTENT:
            channel_options += [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", retry.service_config(self.IDEMPOTENT)),
            ]
        else:
            channel_options.append(("grpc.enable_retries", 0))
        channel_options += list(options)
        self._options = channel_options
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates) if root_certificates is not None or tls else None
        )
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[Callable[[grpc.aio.Channel], Any], Any] = {}

    def _stub_of(self, factory: Callable[[grpc.aio.Channel], Stub]) -> Stub:
        """The stub `factory` builds on this client's channel (e.g. `pb_grpc.RegistryServiceStub`)."""
        # Opened on first use: a grpc.aio channel belongs to the event loop that is running when it is created,
        # so the client may be constructed anywhere, even before asyncio.run.
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
        stub = self._stubs.get(factory)
        if stub is None:
            stub = self._stubs[factory] = factory(self._channel)
        return stub

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; a later call opens a new one."""
        channel, self._channel = self._channel, None
        self._stubs.clear()
        if channel is not None:
            await channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        extra = [("authorization", f"Bearer {self._token}")] if self._token else []
        # Inside a service the current request id and trace context travel on; otherwise each call gets its own id.
        md = outgoing_metadata(extra)
        if not any(k == REQUEST_ID_KEY for k, _ in md):
            md.append((REQUEST_ID_KEY, uuid.uuid4().hex))
        return md

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> Resp:
        md = self._metadata()
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=md)
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc, dict(md)[REQUEST_ID_KEY])
        raise self._explain(err)

    def _explain(self, err: ClientError) -> ClientError:
        """Marks a failure to connect as such, naming the address tried.

        A status the server sent carries its ErrorInfo domain and arrives over a ready channel; a call that never
        reached the server has neither. A read against a server that is down waits out its retries, and when that
        outlasts the deadline the status says only "Deadline Exceeded", so say why."""
        if (
            err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            and not err.domain
            and self._channel is not None
            and self._channel.get_state() != grpc.ChannelConnectivity.READY
        ):
            err.unreachable = True
            if err.code == grpc.StatusCode.UNAVAILABLE:
                err.message = f"cannot reach the {self.SERVICE_LABEL} at {self.address}: {err.message}"
            else:
                err.message = f"{err.message} while retrying: the {self.SERVICE_LABEL} at {self.address} is unreachable"
        return err
