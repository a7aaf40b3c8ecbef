"""Converse, the live conversation on one bidirectional stream: over gRPC, and as a WebSocket through the edge."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from agentvault.messaging.v1 import messaging_service_pb2 as mpb

from ..conftest import auth
from .conftest import Net, local_agent, text_message

pytestmark = pytest.mark.usefixtures("policies")

WAIT = 10.0
PATH = "/api/v1/inbox:converse"
INVALID_ARGUMENT = 3  # google.rpc.Code


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ws_url(n: Net) -> str:
    return n.mesh.url(PATH).replace("http://", "ws://", 1)


async def frame(ws: aiohttp.ClientWebSocketResponse) -> Any:
    msg = await asyncio.wait_for(ws.receive(), WAIT)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return json.loads(msg.data)


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    msg = await asyncio.wait_for(ws.receive(), WAIT)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (msg.type, msg.data)
    return ws.close_code, str(msg.extra or "")


def sent_and_delivered(frames: list[Any], request_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    # The send's answer and the delivery of the message it sent arrive in either order.
    (sent,) = [f for f in frames if f["request_id"] == request_id]
    (delivery,) = [f for f in frames if f["request_id"] == ""]
    return sent["sent"], delivery["delivery"]


async def test_a_conversation_through_the_edge_websocket(net: Net, http: aiohttp.ClientSession) -> None:
    alice = await local_agent(net)
    async with http.ws_connect(ws_url(net), headers=auth(alice.token)) as ws:
        await ws.send_str(json.dumps({"request_id": "s1", "subscribe": {"max_in_flight": 5}}))
        subscribed = await frame(ws)
        assert subscribed["request_id"] == "s1" and subscribed["done"] == {}, subscribed
        # A message to itself: answered on the stream, then delivered on it.
        message = {"recipient": {"agent_id": alice.id}, "parts": [{"text": "note to self"}]}
        await ws.send_str(json.dumps({"request_id": "m1", "send": message}))
        sent, delivery = sent_and_delivered([await frame(ws), await frame(ws)], "m1")
        assert sent["message"]["status"] == "accepted" and sent["message"]["sender"]["agent_id"] == alice.id
        assert delivery["message"]["id"] == sent["message"]["id"]
        assert delivery["message"]["parts"][0]["text"] == "note to self" and delivery["attempt"] == 1
        ack = {"message_id": delivery["message"]["id"], "receipt": delivery["receipt"]}
        await ws.send_str(json.dumps({"request_id": "a1", "ack": ack}))
        acked = await frame(ws)
        assert acked["request_id"] == "a1" and acked["done"] == {}, acked
        # A request the service refuses is answered on the stream, which stays open.
        await ws.send_str(json.dumps({"request_id": "a2", "ack": {"message_id": "nope", "receipt": "nope"}}))
        refused = await frame(ws)
        assert refused["request_id"] == "a2" and refused["error"]["code"] == INVALID_ARGUMENT, refused
        # An empty frame ends the requests: the service ends the call, OK, and the edge closes 1000.
        await ws.send_str("")
        assert (await closed(ws))[0] == 1000
    status = await net.messaging.GetMessage(mpb.GetMessageRequest(id=sent["message"]["id"]), metadata=alice.md)
    assert status.status == "acknowledged"


async def test_two_agents_converse_live(net: Net, http: aiohttp.ClientSession) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    async with (
        http.ws_connect(ws_url(net), headers=auth(alice.token)) as a,
        http.ws_connect(ws_url(net), headers=auth(bob.token)) as b,
    ):
        await b.send_str(json.dumps({"subscribe": {}}))
        assert (await frame(b))["done"] == {}
        message = {"recipient": {"agent_id": bob.id}, "parts": [{"text": "hello bob"}]}
        await a.send_str(json.dumps({"request_id": "to-bob", "send": message}))
        sent = (await frame(a))["sent"]["message"]
        got = (await frame(b))["delivery"]
        assert (got["message"]["id"], got["message"]["sender"]["agent_id"]) == (sent["id"], alice.id)
        await b.send_str(json.dumps({"ack": {"message_id": sent["id"], "receipt": got["receipt"]}}))
        assert (await frame(b))["done"] == {}


async def test_a_bad_frame_gets_an_error_frame_and_closes_1007(net: Net, http: aiohttp.ClientSession) -> None:
    alice = await local_agent(net)
    for bad, field in [
        ("{not json", ""),
        (json.dumps({"send": {"parts": [{"text": "x"}], "colour": "red"}}), "send.colour"),
        (json.dumps({"ack": {"message_id": 7}}), "ack.message_id"),
        ("[1, 2]", ""),
    ]:
        async with http.ws_connect(ws_url(net), headers=auth(alice.token)) as ws:
            await ws.send_str(bad)
            error = (await frame(ws))["error"]
            assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT"), (bad, error)
            violations = [d for d in error["details"] if d["@type"].endswith("BadRequest")]
            assert violations[0]["field_violations"][0]["field"] == field, (bad, error)
            assert await closed(ws) == (1007, "INVALID_ARGUMENT")


async def test_without_credentials_the_conversation_is_refused(net: Net, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(ws_url(net)) as ws:
        error = (await frame(ws))["error"]
        assert (error["code"], error["status"]) == (401, "UNAUTHENTICATED"), error
        assert await closed(ws) == (1011, "UNAUTHENTICATED")
    # A plain GET is told to upgrade; there is no other HTTP method on the path.
    async with http.get(net.mesh.url(PATH)) as resp:
        assert resp.status == 426 and resp.headers["Upgrade"] == "websocket"
        assert "WebSocket" in (await resp.json())["error"]["message"]
    async with http.post(net.mesh.url(PATH), json={}) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET"


async def test_a_subscribe_with_bad_arguments_is_answered_with_an_error(net: Net, http: aiohttp.ClientSession) -> None:
    alice = await local_agent(net)
    async with http.ws_connect(ws_url(net), headers=auth(alice.token)) as ws:
        await ws.send_str(json.dumps({"request_id": "s1", "subscribe": {"max_in_flight": 5000}}))
        answer = await frame(ws)
        assert answer["request_id"] == "s1" and answer["error"]["code"] == INVALID_ARGUMENT, answer
        assert "max_in_flight" in answer["error"]["message"]
        # Refused, so not subscribed: a valid subscribe is accepted after it, and delivers.
        await ws.send_str(json.dumps({"request_id": "s2", "subscribe": {}}))
        assert (await frame(ws))["done"] == {}
        message = {"recipient": {"agent_id": alice.id}, "parts": [{"text": "after all"}]}
        await ws.send_str(json.dumps({"request_id": "m1", "send": message}))
        sent, delivery = sent_and_delivered([await frame(ws), await frame(ws)], "m1")
        assert delivery["message"]["id"] == sent["message"]["id"]


async def next_answer(call: Any) -> mpb.ConverseResponse:
    answer = await asyncio.wait_for(call.read(), WAIT)
    assert answer is not grpc.aio.EOF
    return answer  # type: ignore[no-any-return]


async def test_a_conversation_over_grpc(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    call = net.messaging.Converse(metadata=bob.md)
    await call.write(mpb.ConverseRequest(request_id="s", subscribe=mpb.StreamInboxRequest()))
    assert (await next_answer(call)).WhichOneof("event") == "done"
    await call.write(mpb.ConverseRequest(request_id="m", send=text_message(bob, "to myself")))
    answers = [await next_answer(call), await next_answer(call)]
    (sent,) = [a.sent for a in answers if a.request_id == "m"]
    (delivery,) = [a.delivery for a in answers if a.WhichOneof("event") == "delivery"]
    assert delivery.message.id == sent.message.id and delivery.message.parts[0].text == "to myself"
    # A message from another agent arrives on the same stream.
    other = await net.messaging.SendMessage(
        mpb.SendMessageRequest(message=text_message(bob, "from alice")), metadata=alice.md
    )
    from_alice = (await next_answer(call)).delivery
    assert (from_alice.message.id, from_alice.message.sender.agent_id) == (other.message.id, alice.id)
    for d in (delivery, from_alice):
        await call.write(mpb.ConverseRequest(ack=mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt)))
        assert (await next_answer(call)).WhichOneof("event") == "done"
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), WAIT) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    status = await net.messaging.GetMessage(mpb.GetMessageRequest(id=other.message.id), metadata=alice.md)
    assert status.status == "acknowledged"


async def test_grpc_converse_without_credentials_is_unauthenticated(net: Net) -> None:
    call = net.messaging.Converse()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), WAIT)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
