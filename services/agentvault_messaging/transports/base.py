"""The one small interface every delivery transport implements, and the registry that finds them by name.

A transport is a module in this package that defines `TRANSPORT`, a class implementing `Transport`. The registry
imports every module here at start, so a new agent protocol is one new module and nothing else: no list to edit,
no import to add. The endpoint protocols a transport serves are the words of the registry's endpoint protocols
(http, websocket, a2a, ...); when an agent has endpoints of several, the transport with the lowest `priority`
number wins.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import aiohttp

from agentvault.common.agent_auth import PreparedAuth
from agentvault.messaging.v1 import messaging_service_pb2 as mpb

log = logging.getLogger(__name__)

# Statuses a transport may report for a message it handed over.
DELIVERED = "delivered"  # the agent took it (HTTP 2xx, A2A task submitted or working)
ACKNOWLEDGED = "acknowledged"  # the agent handled it (A2A task completed, or a Message answer)
FAILED = "failed"  # the agent handled it and says it failed (A2A task failed or rejected): not retried


@dataclass(frozen=True)
class Outbound:
    """One message to deliver to one agent's endpoint."""

    message: mpb.Message  # the whole message, sender and ids set by the mesh
    agent_id: str  # the recipient agent (this mesh's registry id)
    endpoint: str  # the registered URL of the endpoint this transport serves
    attempt: int  # 1 for the first delivery
    deadline: float  # seconds this attempt may take, all of it (connect, send, answer)


@dataclass(frozen=True)
class Outcome:
    """How one delivery went. `replies` are the agent's answers (an A2A Message, a completed task's status message
    or artifacts), stored by the mesh as messages from the agent to the sender, correlated with the original."""

    status: str = DELIVERED
    reason: str = ""
    replies: tuple[mpb.Message, ...] = ()
    # Transport-specific ids worth keeping on the message, e.g. {"a2a.task_id": "..."}; strings, bounded by the
    # transport (at most 8 entries of 256 characters).
    annotations: Mapping[str, str] = field(default_factory=dict)


class DeliveryError(Exception):
    """This attempt failed. Retried with backoff unless `permanent` (then dead-lettered at once, with `reason`).
    `retry_after` (seconds) is the agent's own hint (HTTP Retry-After), honoured within the backoff's bounds.
    The text is shown to the sender as the status reason: it must not carry secrets or the agent's full answer."""

    def __init__(self, reason: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason[:1024])
        self.reason = reason[:1024]
        self.permanent = permanent
        self.retry_after = retry_after


@dataclass
class TransportContext:
    """What the mesh gives every transport: one egress-guarded HTTP session (private addresses refused when the
    mesh says so), the recipient agent's prepared credentials (API key, bearer, OAuth, mTLS: the identity issue's
    AgentConnector), and the webhook signing secret of that agent."""

    session: aiohttp.ClientSession
    auth: PreparedAuth
    # Standard Webhooks signing secret for this agent (bytes), derived by the mesh; transports that sign use it.
    signing_secret: bytes
    # Refuse private/loopback destinations (the mesh's MESSAGING_BLOCK_PRIVATE_AGENT_URLS).
    block_private: bool = False
    # Largest answer body read from an agent, in bytes.
    max_answer_bytes: int = 1024 * 1024


class Transport(Protocol):
    """Delivers messages over one agent protocol. One instance per service process, shared by all deliveries; it
    may keep connections (e.g. WebSockets) and must release them in `close`."""

    name: ClassVar[str]  # the transport's name, stored on each message (e.g. "http")
    protocols: ClassVar[tuple[str, ...]]  # the endpoint protocol words it serves (e.g. ("http",))
    priority: ClassVar[int]  # lower wins when an agent has endpoints of several transports

    async def deliver(self, item: Outbound, context: TransportContext) -> Outcome:
        """Hands `item` to the agent within `item.deadline`; DeliveryError when it did not get there."""
        ...

    async def close(self) -> None: ...


def load_transports(package: str = __package__ or "agentvault_messaging.transports") -> dict[str, Transport]:
    """Every transport of the package, by name; a module without `TRANSPORT` (like this one) is skipped, two
    transports with one name are an error."""
    found: dict[str, Transport] = {}
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        loaded = importlib.import_module(f"{package}.{info.name}")
        cls = getattr(loaded, "TRANSPORT", None)
        if cls is None:
            continue
        transport: Transport = cls()
        if transport.name in found:
            raise RuntimeError(f"two transports are named {transport.name!r}")
        found[transport.name] = transport
    return found


def choose(transports: Mapping[str, Transport], endpoints: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The (transport name, endpoint URL) to deliver to an agent with these (protocol, url) endpoints, or None when
    no transport serves any of them (the agent is then local: it reads its inbox)."""
    best: tuple[int, str, str] | None = None
    for protocol, url in endpoints:
        for transport in transports.values():
            if protocol in transport.protocols and (best is None or transport.priority < best[0]):
                best = (transport.priority, transport.name, url)
    return None if best is None else (best[1], best[2])


def message_json(message: mpb.Message) -> dict[str, object]:
    """A message as the JSON agents receive (the REST API's form: proto field names)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)
