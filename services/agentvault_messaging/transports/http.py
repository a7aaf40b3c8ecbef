"""Delivery by HTTP webhook: a POST of the message JSON, signed per the Standard Webhooks spec."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import urlsplit

import aiohttp
from standardwebhooks import Webhook

from agentvault.common import agent_auth, egress, tracing
from agentvault.common.errors import Unavailable
from agentvault.messaging.v1 import messaging_service_pb2 as mpb

from .base import DELIVERED, DeliveryError, Outbound, Outcome, TransportContext, message_json, parse_reply, status_error

log = logging.getLogger(__name__)


class HttpTransport:
    """POSTs each message to the agent's endpoint with the agent's credentials and a Standard Webhooks signature."""

    name: ClassVar[str] = "http"
    protocols: ClassVar[tuple[str, ...]] = ("http",)
    priority: ClassVar[int] = 30

    async def deliver(self, item: Outbound, context: TransportContext) -> Outcome:
        if urlsplit(item.endpoint).scheme not in ("http", "https"):
            raise DeliveryError("the endpoint URL must be http or https", permanent=True)
        if not context.signing_secret:
            # Never unsigned: the agent could not tell the mesh from anyone else.
            raise DeliveryError("no webhook signing secret for this agent", permanent=True)
        try:
            egress.check_url(item.endpoint, context.block_private)
        except egress.EgressRefused as exc:
            raise DeliveryError(f"endpoint refused: {exc}", permanent=True) from None
        body = json.dumps(message_json(item.message), separators=(",", ":"), ensure_ascii=False)
        now = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": item.message.id,
            "webhook-timestamp": str(now),
            # Raw bytes: Webhook only base64-decodes str secrets (the "whsec_..." form agents are given).
            "webhook-signature": Webhook(context.signing_secret).sign(
                item.message.id, datetime.fromtimestamp(now, tz=UTC), body
            ),
        }
        # The delivery span's W3C traceparent (when spans are recorded): the agent's own spans can join the trace.
        headers.update(tracing.current_headers())
        try:
            # The whole attempt, the OAuth token fetch included, within the deadline.
            async with asyncio.timeout(item.deadline):
                answer = await agent_auth.call(
                    context.session,
                    "POST",
                    item.endpoint,
                    context.auth,
                    # One byte more than allowed tells an oversize answer from one of exactly the limit.
                    max_body=context.max_answer_bytes + 1,
                    headers=headers,
                    data=body.encode(),
                    timeout=aiohttp.ClientTimeout(total=item.deadline),
                )
        except TimeoutError:
            raise DeliveryError(f"no answer within {item.deadline:g}s") from None
        except egress.EgressRefused as exc:
            raise DeliveryError(f"endpoint refused: {exc}", permanent=True) from None
        except Unavailable as exc:  # no OAuth token, no client certificate: may come back
            raise DeliveryError(f"auth: {exc.message[:200]}") from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError):
            raise DeliveryError("TLS handshake with the agent failed") from None
        except aiohttp.ClientConnectorError as exc:
            raise DeliveryError(f"cannot connect to the agent: {type(exc).__name__}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"connection to the agent failed: {type(exc).__name__}") from None
        return _outcome(answer, context.max_answer_bytes)

    async def close(self) -> None:
        """Nothing to release: the mesh owns the session."""


def _outcome(answer: agent_auth.Answer, max_answer_bytes: int) -> Outcome:
    status = answer.status
    if 200 <= status < 300:
        if len(answer.body) > max_answer_bytes:
            return Outcome(DELIVERED, reason=f"answer larger than {max_answer_bytes} bytes; reply dropped")
        reply, problem = reply_from_answer(answer.body)
        return Outcome(DELIVERED, reason=problem, replies=(reply,) if reply is not None else ())
    raise status_error(status, answer.headers.get("Retry-After"))


def reply_from_answer(body: bytes) -> tuple[mpb.Message | None, str]:
    """The reply in a 2xx answer `{"reply": {...message...}}`, or None; and why a reply there was dropped."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, ""  # any answer is fine; only a JSON object with "reply" carries one
    if not isinstance(document, dict) or document.get("reply") is None:
        return None, ""
    return parse_reply(document["reply"])


TRANSPORT = HttpTransport
