"""Local agents talking through the messaging service: sends, inboxes, replies, idempotency, policy, dead letters."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.policy.v1 import policy_service_pb2 as ppb

from ..conftest import eventually
from ..registry.test_jwt_callers import reason
from .conftest import LocalAgent, Net, local_agent, text_message

pytestmark = pytest.mark.usefixtures("policies")


async def receive(n: Net, agent: LocalAgent, **fields: int) -> list[mpb.Delivery]:
    answer = await n.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(**fields), metadata=agent.md)
    return list(answer.deliveries)


async def test_two_local_agents_talk_with_a_correlated_reply(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    sent = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(bob, "hello bob", headers={"topic": "greeting"})),
        metadata=alice.md,
    )
    m = sent.message
    assert (m.status, m.transport, m.sender.agent_id, m.sender.kind) == ("accepted", "inbox", alice.id, "agent")
    assert m.correlation_id == m.id and m.conversation_id

    got = await receive(net, bob, wait_seconds=5)
    assert [d.message.id for d in got] == [m.id]
    assert got[0].message.parts[0].text == "hello bob" and got[0].message.headers["topic"] == "greeting"
    assert got[0].attempt == 1 and got[0].receipt
    # The sender waits for the reply while the recipient answers it.
    waiting = asyncio.ensure_future(
        net.messaging.AwaitReply(mpb.AwaitReplyRequest(id=m.id, wait_seconds=10), metadata=alice.md)
    )
    await net.messaging.AckMessage(mpb.AckMessageRequest(message_id=m.id, receipt=got[0].receipt), metadata=bob.md)
    reply = mpb.Message(in_reply_to=m.id, parts=[mpb.Part(text="hi alice")])
    answered = await net.messaging.SendMessage(mpb.SendMessageRequest(message=reply), metadata=bob.md)
    assert answered.message.correlation_id == m.correlation_id
    assert answered.message.conversation_id == m.conversation_id
    got_reply = (await waiting).reply
    assert (got_reply.id, got_reply.parts[0].text, got_reply.in_reply_to) == (answered.message.id, "hi alice", m.id)
    assert got_reply.sender.agent_id == bob.id
    status = await net.messaging.GetMessage(mpb.GetMessageRequest(id=m.id), metadata=alice.md)
    assert status.status == "acknowledged"
    # Someone else sees neither message.
    carol = await local_agent(net)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.GetMessage(mpb.GetMessageRequest(id=m.id), metadata=carol.md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_same_idempotency_key_gives_the_same_message(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message = text_message(bob, "once", idempotency_key="order-17")
    first = await net.messaging.SendMessage(mpb.SendMessageRequest(message=message), metadata=alice.md)
    again = await asyncio.gather(
        *(net.messaging.SendMessage(mpb.SendMessageRequest(message=message), metadata=alice.md) for _ in range(5))
    )
    assert {a.message.id for a in again} == {first.message.id} and all(a.duplicate for a in again)
    assert not first.duplicate
    changed = text_message(bob, "twice?", idempotency_key="order-17")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.SendMessage(mpb.SendMessageRequest(message=changed), metadata=alice.md)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason(caught.value)[0] == "IDEMPOTENCY_KEY_REUSED"
    got = await receive(net, bob, max_messages=10)
    assert [d.message.id for d in got] == [first.message.id]


async def test_an_inbox_keeps_send_order_and_redelivers_what_is_not_acked(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    ids = []
    for i in range(5):
        sent = await net.messaging.SendMessage(
            mpb.SendMessageRequest(message=text_message(bob, f"n{i}", conversation_id="c1")), metadata=alice.md
        )
        ids.append(sent.message.id)
    first = await receive(net, bob, max_messages=3, visibility_timeout_seconds=1)
    assert [d.message.id for d in first] == ids[:3]
    rest = await receive(net, bob, max_messages=10, visibility_timeout_seconds=30)
    assert [d.message.id for d in rest] == ids[3:]
    for d in first[:2]:
        await net.messaging.AckMessage(
            mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt), metadata=bob.md
        )
    # The third was neither acked nor nacked: it comes again once its visibility timeout ends, as attempt 2.
    again = await receive(net, bob, wait_seconds=5)
    assert [(d.message.id, d.attempt) for d in again] == [(ids[2], 2)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.AckMessage(
            mpb.AckMessageRequest(message_id=ids[2], receipt=first[2].receipt), metadata=bob.md
        )
    assert reason(caught.value)[0] == "RECEIPT_STALE"


async def test_a_poison_message_is_dead_lettered_while_others_flow(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    poison = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(bob, "poison")), metadata=alice.md
    )
    fine = await net.messaging.SendMessage(mpb.SendMessageRequest(message=text_message(bob, "fine")), metadata=alice.md)
    handled = []
    for _ in range(6):  # MESSAGING_MAX_ATTEMPTS is 3 in these tests
        for d in await receive(net, bob, max_messages=10):
            if d.message.parts[0].text == "poison":
                await net.messaging.NackMessage(
                    mpb.NackMessageRequest(message_id=d.message.id, receipt=d.receipt, reason="cannot parse"),
                    metadata=bob.md,
                )
            else:
                handled.append(d.message.id)
                await net.messaging.AckMessage(
                    mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt), metadata=bob.md
                )
    assert handled == [fine.message.id]
    dead = await net.messaging.GetMessage(mpb.GetMessageRequest(id=poison.message.id), metadata=alice.md)
    assert dead.status == "dead_lettered" and "3 times" in dead.status_reason
    listed = await net.messaging.ListDeadLetters(mpb.ListDeadLettersRequest(agent_id=bob.id), metadata=net.admin)
    assert [m.id for m in listed.messages] == [poison.message.id]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.ListDeadLetters(mpb.ListDeadLettersRequest(), metadata=alice.md)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    replayed = await net.messaging.ReplayDeadLetter(
        mpb.ReplayDeadLetterRequest(id=poison.message.id), metadata=net.admin
    )
    assert (replayed.status, replayed.attempts) == ("accepted", 0)
    again = await receive(net, bob)
    assert [d.message.id for d in again] == [poison.message.id]
    await net.messaging.NackMessage(
        mpb.NackMessageRequest(message_id=poison.message.id, receipt=again[0].receipt, dead_letter=True),
        metadata=bob.md,
    )
    purged = await net.messaging.PurgeDeadLetters(mpb.PurgeDeadLettersRequest(agent_id=bob.id), metadata=net.admin)
    assert purged.purged == 1


async def test_policy_deny_refuses_and_ask_holds_until_approved(net: Net) -> None:
    alice = await local_agent(net)
    closed = await local_agent(net, tags=["closed"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.SendMessage(mpb.SendMessageRequest(message=text_message(closed, "hi")), metadata=alice.md)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(caught.value)[0] == "MESSAGE_DENIED" and "closed agents take no messages" in caught.value.details()

    guarded = await local_agent(net, tags=["guarded"])
    held = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(guarded, "may I?")), metadata=alice.md
    )
    assert held.message.status == "held" and held.message.approval_id
    assert await receive(net, guarded) == []
    approval = await net.policies.GetApproval(ppb.GetApprovalRequest(id=held.message.approval_id), metadata=net.admin)
    assert approval.action == "message.send" and approval.status == "pending"
    await net.policies.ApproveApproval(ppb.ApproveApprovalRequest(id=approval.id, note="ok"), metadata=net.admin)
    got = await receive(net, guarded, wait_seconds=10)
    assert [d.message.id for d in got] == [held.message.id]

    denied = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(guarded, "and this?")), metadata=alice.md
    )
    await net.policies.DenyApproval(
        ppb.DenyApprovalRequest(id=denied.message.approval_id, note="no"), metadata=net.admin
    )

    async def refused() -> None:
        m = await net.messaging.GetMessage(mpb.GetMessageRequest(id=denied.message.id), metadata=alice.md)
        assert m.status == "refused" and "no" in m.status_reason

    await eventually(refused, 10)


async def test_bad_and_oversize_messages_are_refused_clearly(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    bad = mpb.Message(
        recipient=mpb.Party(agent_id="not-a-uuid"),
        parts=[mpb.Part(), mpb.Part(url="ftp://x")],
        headers={"bad name": "x"},
        in_reply_to="nope",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.SendMessage(mpb.SendMessageRequest(message=bad), metadata=alice.md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("message.recipient.agent_id", "message.parts[0]", "message.parts[1].url", "message.in_reply_to"):
        assert field in caught.value.details()
    big = text_message(bob, "x" * (1024 * 1024 + 10))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.SendMessage(mpb.SendMessageRequest(message=big), metadata=alice.md)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(caught.value)[0] == "MESSAGE_TOO_LARGE"
    missing = text_message(str(uuid.uuid4()), "anyone?")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.SendMessage(mpb.SendMessageRequest(message=missing), metadata=alice.md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_inbox_stream_delivers_as_messages_arrive_within_its_in_flight_bound(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    stream = net.messaging.StreamInbox(mpb.StreamInboxRequest(max_in_flight=2), metadata=bob.md)
    ids = []
    for i in range(4):
        sent = await net.messaging.SendMessage(
            mpb.SendMessageRequest(message=text_message(bob, f"s{i}")), metadata=alice.md
        )
        ids.append(sent.message.id)
    first = [await stream.read(), await stream.read()]
    assert [d.message.id for d in first] == ids[:2]
    # Two in flight: nothing more until one is acked.
    third = asyncio.ensure_future(stream.read())
    await asyncio.sleep(0)  # let the read start
    done, _ = await asyncio.wait({third}, timeout=0.5)
    assert not done, "the stream delivered beyond max_in_flight"
    await net.messaging.AckMessage(
        mpb.AckMessageRequest(message_id=first[0].message.id, receipt=first[0].receipt), metadata=bob.md
    )
    assert (await asyncio.wait_for(third, 5)).message.id == ids[2]
    stream.cancel()


async def test_an_agent_reads_only_its_own_inbox_even_beside_agents_of_its_owner(net: Net) -> None:
    alice, bob, sibling = await local_agent(net), await local_agent(net), await local_agent(net)
    sent = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(bob, "for bob")), metadata=alice.md
    )
    # All three agents belong to the admin, whose id their credentials carry; still, only bob holds bob's mail.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(agent_id=bob.id), metadata=sibling.md)
    assert reason(caught.value)[0] == "INBOX_NOT_YOURS"
    got = await receive(net, bob)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.AckMessage(
            mpb.AckMessageRequest(message_id=sent.message.id, receipt=got[0].receipt), metadata=sibling.md
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await net.messaging.SendMessage(
            mpb.SendMessageRequest(message=mpb.Message(in_reply_to=sent.message.id, parts=[mpb.Part(text="x")])),
            metadata=sibling.md,
        )
    assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    # Given back, it is the owner's (a person's) to read.
    await net.messaging.NackMessage(
        mpb.NackMessageRequest(message_id=sent.message.id, receipt=got[0].receipt), metadata=bob.md
    )
    owner = await net.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(agent_id=bob.id), metadata=net.admin)
    assert [d.message.id for d in owner.deliveries] == [sent.message.id]
