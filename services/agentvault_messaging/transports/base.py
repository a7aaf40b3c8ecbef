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
import math
import pkgutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Protocol

import aiohttp
from google.protobuf import json_format

from agentvault.common.agent_auth import PreparedAuth
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault_messaging import model

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


# Statuses worth trying again: the agent may take it later (timeout, throttled, its own failure: any 5xx too).
RETRYABLE_STATUSES = frozenset({408, 429})
MAX_RETRY_AFTER = 3600.0


def retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def status_error(status: int, retry_after: str | None) -> DeliveryError:
    """An agent's non-2xx HTTP answer: 408, 429 and 5xx are retried (429 and 503 with their Retry-After), a
    redirect is refused (the credentials are for this address only), any other 4xx is the agent's refusal."""
    if retryable_status(status):
        hint = retry_after_seconds(retry_after) if status in (429, 503) else None
        return DeliveryError(f"HTTP {status}", retry_after=hint)
    if 300 <= status < 400:
        return DeliveryError(f"HTTP {status}: redirects are not followed", permanent=True)
    return DeliveryError(f"HTTP {status}", permanent=True)


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP Retry-After (seconds or a date) as seconds from now, within 0..MAX_RETRY_AFTER; None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def parse_reply(raw: Any) -> tuple[mpb.Message | None, str]:
    """A reply message in the message JSON (from a webhook's answer or a WebSocket ack), or None and why it was
    dropped (never the agent's text). Only what a sender may write is kept (model.content): an agent's reply
    cannot claim a sender, a status or a history."""
    if not isinstance(raw, dict) or "parts" not in raw:
        return None, "reply dropped: not a message object with parts"
    reply = mpb.Message()
    try:
        json_format.ParseDict(raw, reply, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        log.debug("agent reply is not a valid message: %.200s", exc)
        return None, "reply dropped: not a valid message"
    if not reply.parts:
        return None, "reply dropped: a message needs at least one part"
    return model.content(reply), ""


def message_json(message: mpb.Message) -> dict[str, object]:
    """A message as the JSON agents receive (the REST API's form: proto field names)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
