"""AckMessages: many deliveries acknowledged at once, each receipt answered on its own."""

from __future__ import annotations

import uuid

import grpc
import pytest

from agentvault.messaging.v1 import messaging_service_pb2 as mpb

from .conftest import Net, local_agent, text_message

pytestmark = pytest.mark.usefixtures("policies")


async def test_a_batch_ack_answers_each_receipt_and_acks_only_the_current_ones(net: Net) -> None:
    alice, bob, carol = await local_agent(net), await local_agent(net), await local_agent(net)
    ids = []
    for i in range(4):
        sent = await net.messaging.SendMessage(
            mpb.SendMessageRequest(message=text_message(bob, f"m{i}")), metadata=alice.md
        )
        ids.append(sent.message.id)
    got = await net.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(max_messages=10), metadata=bob.md)
    receipts = {d.message.id: d.receipt for d in got.deliveries}
    assert sorted(receipts) == sorted(ids)
    first, second, third, fourth = ids
    await net.messaging.AckMessage(mpb.AckMessageRequest(message_id=first, receipt=receipts[first]), metadata=bob.md)
    # Another agent cannot ack bob's delivery, even with its receipt: not found for it, and left as it was.
    other = await net.messaging.AckMessages(
        mpb.AckMessagesRequest(receipts=[mpb.AckMessageRequest(message_id=fourth, receipt=receipts[fourth])]),
        metadata=carol.md,
    )
    assert [(r.message_id, r.acknowledged, r.reason) for r in other.results] == [(fourth, False, "MESSAGE_NOT_FOUND")]
    unknown = str(uuid.uuid4())
    answer = await net.messaging.AckMessages(
        mpb.AckMessagesRequest(
            receipts=[
                mpb.AckMessageRequest(message_id=first, receipt=receipts[first]),
                mpb.AckMessageRequest(message_id=second, receipt=receipts[second]),
                mpb.AckMessageRequest(message_id=third, receipt=str(uuid.uuid4())),
                mpb.AckMessageRequest(message_id=unknown, receipt=str(uuid.uuid4())),
                mpb.AckMessageRequest(message_id=fourth, receipt=receipts[fourth]),
                mpb.AckMessageRequest(message_id=second, receipt=receipts[second]),  # named twice: once
            ]
        ),
        metadata=bob.md,
    )
    assert [(r.message_id, r.acknowledged, r.reason) for r in answer.results] == [
        (first, True, "ALREADY_ACKNOWLEDGED"),
        (second, True, ""),
        (third, False, "RECEIPT_STALE"),
        (unknown, False, "MESSAGE_NOT_FOUND"),
        (fourth, True, ""),
    ]
    statuses = {}
    for key in ids:
        statuses[key] = (await net.messaging.GetMessage(mpb.GetMessageRequest(id=key), metadata=bob.md)).status
    assert statuses == {first: "acknowledged", second: "acknowledged", third: "delivered", fourth: "acknowledged"}
    # The stale one was left alone: its current receipt still acknowledges it.
    again = await net.messaging.AckMessages(
        mpb.AckMessagesRequest(receipts=[mpb.AckMessageRequest(message_id=third, receipt=receipts[third])]),
        metadata=bob.md,
    )
    assert [(r.acknowledged, r.reason) for r in again.results] == [(True, "")]


async def test_a_bad_batch_ack_is_refused_with_the_field(net: Net) -> None:
    bob = await local_agent(net)
    for request, field in (
        (mpb.AckMessagesRequest(), "receipts"),
        (
            mpb.AckMessagesRequest(
                receipts=[mpb.AckMessageRequest(message_id=str(uuid.uuid4()), receipt=str(uuid.uuid4()))] * 1001
            ),
            "receipts",
        ),
        (
            mpb.AckMessagesRequest(
                receipts=[
                    mpb.AckMessageRequest(message_id=str(uuid.uuid4()), receipt=str(uuid.uuid4())),
                    mpb.AckMessageRequest(message_id="nope", receipt=str(uuid.uuid4())),
                ]
            ),
            "receipts[1].message_id",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await net.messaging.AckMessages(request, metadata=bob.md)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")
