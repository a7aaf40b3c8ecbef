"""MessagingClient: a typed asyncio client for agentvault.messaging.v1.MessagingService (messages, inboxes)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, timestamp_pb2

from agentvault.client.base import GrpcClient, pages
from agentvault.client.errors import from_rpc_error
from agentvault.common.interceptors import REQUEST_ID_KEY
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

SERVICE = mpb.DESCRIPTOR.services_by_name["MessagingService"].full_name
# Safe to repeat. SendMessage is, because send_message gives every message an id (or its idempotency key) before
# the first attempt, and the service answers a repeated id or key with the stored message. AckMessage is: acking
# an acknowledged delivery succeeds again. Not these: ReceiveMessages (a repeat claims more), AwaitReply (it takes
# the reply from the inbox), NackMessage, ReplayDeadLetter (a repeat finds no dead letter), PurgeDeadLetters.
IDEMPOTENT_METHODS = (
    "SendMessage",
    "GetMessage",
    "ListMessages",
    "AckMessage",
    "ListDeadLetters",
    "GetMessageSchema",
    # Its first_index makes a repeat harmless: parts already stored are checked, not added again.
    "AppendParts",
)
# The most a server waits for a reply (AwaitReply) or a first message (ReceiveMessages).
MAX_AWAIT_SECONDS = 60
MAX_RECEIVE_WAIT_SECONDS = 20

Event = TypeVar("Event")


class MessagingClient(GrpcClient):
    """Sends messages between agents, reads inboxes, watches statuses and manages dead letters.

    The messaging service serves this API: address default $MESSAGING_ADDR, else 127.0.0.1:$MESSAGING_PORT; the
    other options are GrpcClient's (token, timeout, root_certificates, tls, retry, options). The sender is the
    credential's principal: an agent by its own OAuth token, a person by an API key."""

    SERVICE_LABEL = "messaging service"
    ADDRESS_ENV, PORT_ENV = "MESSAGING_ADDR", "MESSAGING_PORT"
    IDEMPOTENT = tuple((SERVICE, m) for m in IDEMPOTENT_METHODS)

    @property
    def _stub(self) -> mpb_grpc.MessagingServiceAsyncStub:
        return self._stub_of(mpb_grpc.MessagingServiceStub)

    # ----------------------------------------------------------------------------------------- messages

    async def send_message(self, message: mpb.Message, *, timeout: float | None = None) -> mpb.SendMessageResponse:
        """Sends `message` (a recipient, or `in_reply_to`, and its parts): accepted, or held for an approval.

        A message with neither an id nor an idempotency key is sent with a new UUID as its id (a copy; `message`
        is left alone), so that a retried attempt is the same message (`duplicate: true`), never a second one.
        An id is not added next to a key: the key then decides, and the same key must come with the same id."""
        if not message.id and not message.idempotency_key:
            copy = mpb.Message()
            copy.CopyFrom(message)
            copy.id = str(uuid.uuid4())
            message = copy
        return await self._call(self._stub.SendMessage, mpb.SendMessageRequest(message=message), timeout)

    async def get_message(self, id: str, *, timeout: float | None = None) -> mpb.Message:
        return await self._call(self._stub.GetMessage, mpb.GetMessageRequest(id=id), timeout)

    async def list_messages(
        self,
        *,
        conversation_id: str = "",
        correlation_id: str = "",
        agent_id: str = "",
        status: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> mpb.ListMessagesResponse:
        request = mpb.ListMessagesRequest(
            page_size=page_size,
            page_token=page_token,
            conversation_id=conversation_id,
            correlation_id=correlation_id,
            agent_id=agent_id,
            status=status,
        )
        return await self._call(self._stub.ListMessages, request, timeout)

    async def iter_messages(
        self,
        *,
        conversation_id: str = "",
        correlation_id: str = "",
        agent_id: str = "",
        status: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[mpb.Message]:
        async for page in pages(
            lambda t: self.list_messages(
                conversation_id=conversation_id,
                correlation_id=correlation_id,
                agent_id=agent_id,
                status=status,
                page_size=page_size,
                page_token=t,
                timeout=timeout,
            )
        ):
            for message in page.messages:
                yield message

    async def await_reply(self, id: str, *, wait_seconds: int = 0, timeout: float | None = None) -> mpb.Message | None:
        """The reply to message `id` (which the caller sent), taken from the caller's inbox, or None when none came
        within `wait_seconds` (0 to 60). Never retried: the reply is acknowledged on the way out. The call's
        deadline is lengthened to cover the wait."""
        request = mpb.AwaitReplyRequest(id=id, wait_seconds=wait_seconds)
        deadline = (self.timeout if timeout is None else timeout) + max(wait_seconds, 0)
        answer = await self._call(self._stub.AwaitReply, request, deadline)
        return answer.reply if answer.HasField("reply") else None

    async def watch_messages(
        self, *, id: str = "", conversation_id: str = "", agent_id: str = ""
    ) -> AsyncIterator[mpb.MessageEvent]:
        """Status changes of one message (its current status first), a conversation, or an agent's traffic; at
        least one filter. No deadline; it ends when the server ends it (see `_stream`)."""
        request = mpb.WatchMessagesRequest(id=id, conversation_id=conversation_id, agent_id=agent_id)
        async for event in self._stream(self._stub.WatchMessages, request):
            yield event

    async def get_message_schema(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The JSON Schema of the message format."""
        answer = await self._call(self._stub.GetMessageSchema, mpb.GetMessageSchemaRequest(), timeout)
        return dict(json_format.MessageToDict(answer.schema))

    # ------------------------------------------------------------------------------------------- inboxes

    async def receive_messages(
        self,
        *,
        agent_id: str = "",
        max_messages: int = 0,
        visibility_timeout_seconds: int = 0,
        wait_seconds: int = 0,
        timeout: float | None = None,
    ) -> list[mpb.Delivery]:
        """Takes up to `max_messages` (server default 10) from the caller's inbox or that of `agent_id` (an agent it
        owns), each hidden from other receivers for `visibility_timeout_seconds`; with `wait_seconds` (0 to 20)
        waits for a first one. Never retried: a repeat would claim more. The deadline covers the wait."""
        request = mpb.ReceiveMessagesRequest(
            agent_id=agent_id,
            max_messages=max_messages,
            visibility_timeout_seconds=visibility_timeout_seconds,
            wait_seconds=wait_seconds,
        )
        deadline = (self.timeout if timeout is None else timeout) + max(wait_seconds, 0)
        return list((await self._call(self._stub.ReceiveMessages, request, deadline)).deliveries)

    async def ack(self, message_id: str, receipt: str, *, timeout: float | None = None) -> None:
        """The delivery was handled: it is not delivered again."""
        await self._call(self._stub.AckMessage, mpb.AckMessageRequest(message_id=message_id, receipt=receipt), timeout)

    async def nack(
        self,
        message_id: str,
        receipt: str,
        *,
        delay_seconds: int = 0,
        reason: str = "",
        dead_letter: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Gives the delivery back: due again after `delay_seconds`, or dead-lettered now."""
        request = mpb.NackMessageRequest(
            message_id=message_id, receipt=receipt, delay_seconds=delay_seconds, reason=reason, dead_letter=dead_letter
        )
        await self._call(self._stub.NackMessage, request, timeout)

    async def stream_inbox(
        self, *, agent_id: str = "", max_in_flight: int = 0, visibility_timeout_seconds: int = 0
    ) -> AsyncIterator[mpb.Delivery]:
        """The inbox's deliveries as they arrive, at most `max_in_flight` unacknowledged at a time (ack each with
        `ack`). No deadline; it ends when the server ends it (see `_stream`)."""
        request = mpb.StreamInboxRequest(
            agent_id=agent_id, max_in_flight=max_in_flight, visibility_timeout_seconds=visibility_timeout_seconds
        )
        async for delivery in self._stream(self._stub.StreamInbox, request):
            yield delivery

    # ------------------------------------------------------------------------------------ streamed parts

    async def append_parts(
        self,
        message_id: str,
        first_index: int,
        parts: list[mpb.Part],
        *,
        final: bool = False,
        abort_reason: str = "",
        timeout: float | None = None,
    ) -> mpb.AppendPartsResponse:
        """Appends parts to a message the caller sent with `streaming` set; `first_index` is the index of the first
        part given (the message's own parts are 1 to n). `final` closes the stream, `abort_reason` aborts it."""
        request = mpb.AppendPartsRequest(
            message_id=message_id, first_index=first_index, parts=parts, final=final, abort_reason=abort_reason
        )
        return await self._call(self._stub.AppendParts, request, timeout)

    async def stream_parts(self, message_id: str, *, after_index: int = 0) -> AsyncIterator[mpb.StreamPartsResponse]:
        """The message's parts after `after_index` as they come, and last the end item (`state` closed or
        aborted). A stream the server ended early (a restart) is opened again after the last part received."""
        while True:
            request = mpb.StreamPartsRequest(message_id=message_id, after_index=after_index)
            async for item in self._stream(self._stub.StreamParts, request):
                yield item
                if item.state:
                    return
                after_index = item.index

    # -------------------------------------------------------------------------------------- dead letters

    async def list_dead_letters(
        self, *, agent_id: str = "", page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> mpb.ListDeadLettersResponse:
        request = mpb.ListDeadLettersRequest(page_size=page_size, page_token=page_token, agent_id=agent_id)
        return await self._call(self._stub.ListDeadLetters, request, timeout)

    async def iter_dead_letters(
        self, *, agent_id: str = "", page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[mpb.Message]:
        async for page in pages(
            lambda t: self.list_dead_letters(agent_id=agent_id, page_size=page_size, page_token=t, timeout=timeout)
        ):
            for message in page.messages:
                yield message

    async def replay_dead_letter(self, id: str, *, timeout: float | None = None) -> mpb.Message:
        """Sends a dead letter again, its attempts reset (admins)."""
        return await self._call(self._stub.ReplayDeadLetter, mpb.ReplayDeadLetterRequest(id=id), timeout)

    async def purge_dead_letters(
        self, *, agent_id: str = "", before: datetime | None = None, timeout: float | None = None
    ) -> int:
        """Deletes dead letters: all, `agent_id`'s, or those dead-lettered before `before` (aware); how many."""
        request = mpb.PurgeDeadLettersRequest(agent_id=agent_id)
        if before is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(before)
            request.before.CopyFrom(stamp)
        return (await self._call(self._stub.PurgeDeadLetters, request, timeout)).purged

    # ------------------------------------------------------------------------------------------- streams

    async def _stream(
        self, method: grpc.aio.UnaryStreamMultiCallable[Any, Event], request: Any
    ) -> AsyncIterator[Event]:
        """A server stream's messages, as PolicyClient.watch_approvals reads them: it ends when the server ends
        it, also by shutting down (the reader opens a new one); one that could not start, or that the server
        refused, raises ClientError."""
        md = self._metadata()
        call = method(request, timeout=None, metadata=md)
        connected = False
        try:
            await call.wait_for_connection()  # the request reached the server
            connected = True
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc, dict(md)[REQUEST_ID_KEY])
            # A status without an ErrorInfo domain is gRPC's own, not the service's: after the request got
            # through, that is the server going away (its shutdown cancels the calls still open).
            if connected and not err.domain and err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                log.info("the %s ended the stream: %s", self.SERVICE_LABEL, err)
                return
            raise self._explain(err) from None
        finally:
            call.cancel()
