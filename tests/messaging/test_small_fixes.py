"""Issue 12's small leftovers: a JSON part with a null beside another kind; an external WebSocket agent dialling in."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault_edge.json_in import json_to_message
from agentvault_edge.transcode import FieldError

from ..conftest import auth
from .conftest import Net, local_agent, text_message


@pytest.mark.parametrize(
    "part",
    [{"text": "hi", "data": None}, {"data": None, "text": "hi"}, {"url": "https://x.example/a", "data": None}],
)
def test_a_null_data_beside_another_part_kind_is_absent_whatever_the_keys_order(part: dict[str, object]) -> None:
    """`"data": null` beside another kind is what a JSON writer emits for a field it left unset: the other kind is
    the part's content. Before, the keys' order decided (text silently lost when data came last)."""
    request = mpb.SendMessageRequest()
    json_to_message({"message": {"parts": [part]}}, request)
    kind = next(k for k in part if k != "data")
    assert request.message.parts[0].WhichOneof("content") == kind
    assert getattr(request.message.parts[0], kind) == part[kind]


def test_two_real_part_kinds_are_refused_by_their_field() -> None:
    with pytest.raises(FieldError) as caught:
        json_to_message({"message": {"parts": [{"text": "hi", "data": {"a": 1}}]}}, mpb.SendMessageRequest())
    assert caught.value.field == "message.parts[0].data"
    assert "only one of content" in str(caught.value)


def test_a_null_data_alone_is_the_json_null_and_a_null_text_is_absent() -> None:
    alone = mpb.SendMessageRequest()
    json_to_message({"message": {"parts": [{"data": None}]}}, alone)
    assert alone.message.parts[0].WhichOneof("content") == "data"
    assert alone.message.parts[0].data.WhichOneof("kind") == "null_value"
    text = mpb.SendMessageRequest()
    json_to_message({"message": {"parts": [{"text": "hi", "url": None}]}}, text)
    assert text.message.parts[0].WhichOneof("content") == "text"


@pytest.mark.usefixtures("policies")
async def test_an_external_websocket_agent_dials_in_and_gets_what_it_missed(net: Net) -> None:
    """An agent outside the mesh with no push endpoint registered (its own credential, a plain aiohttp client, not
    the mesh's code): it opens the edge's WebSocket, receives, replies and acks; what is sent while it is away waits
    in its inbox and comes, in order, when it connects again."""
    alice, remote = await local_agent(net), await local_agent(net)
    url = net.mesh.url("/api/v1/inbox:converse").replace("http://", "ws://", 1)

    async def send(text: str) -> str:
        sent = await net.messaging.SendMessage(
            mpb.SendMessageRequest(message=text_message(remote, text)), metadata=alice.md
        )
        return sent.message.id

    async def frame(ws: aiohttp.ClientWebSocketResponse) -> Any:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
        return json.loads(msg.data)

    first = await send("are you there?")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers=auth(remote.token)) as ws:
            await ws.send_str(json.dumps({"request_id": "sub", "subscribe": {"max_in_flight": 10}}))
            assert (await frame(ws))["done"] == {}
            delivery = (await frame(ws))["delivery"]
            assert (delivery["message"]["id"], delivery["message"]["parts"][0]["text"]) == (first, "are you there?")
            reply = {"in_reply_to": first, "parts": [{"text": "here"}]}
            await ws.send_str(json.dumps({"request_id": "r", "send": reply}))
            await ws.send_str(
                json.dumps({"request_id": "a", "ack": {"message_id": first, "receipt": delivery["receipt"]}})
            )
            answers = {f["request_id"]: f for f in [await frame(ws), await frame(ws)]}
            assert answers["r"]["sent"]["message"]["status"] == "accepted" and answers["a"]["done"] == {}
        # Away: these wait in its inbox.
        missed = [await send(f"while away {i}") for i in range(3)]
        got = await net.messaging.ReceiveMessages(mpb.ReceiveMessagesRequest(wait_seconds=5), metadata=alice.md)
        assert [(d.message.in_reply_to, d.message.parts[0].text) for d in got.deliveries] == [(first, "here")]
        async with http.ws_connect(url, headers=auth(remote.token)) as ws:
            await ws.send_str(json.dumps({"request_id": "sub", "subscribe": {}}))
            assert (await frame(ws))["done"] == {}
            deliveries = [(await frame(ws))["delivery"] for _ in missed]
            assert [d["message"]["id"] for d in deliveries] == missed
            assert all(d["attempt"] == 1 for d in deliveries)
    status = await net.messaging.GetMessage(mpb.GetMessageRequest(id=first), metadata=alice.md)
    assert status.status == "acknowledged"


@pytest.mark.parametrize("order", ["text-first", "data-first"])
def test_the_a2a_endpoint_reads_a_null_data_beside_text_as_absent_whatever_the_order(order: str) -> None:
    from a2a.types import a2a_pb2 as a2a

    from agentvault_edge.a2a_routes import _parse_params

    part: dict[str, object] = {"text": "hi", "data": None} if order == "text-first" else {"data": None, "text": "hi"}
    parsed = _parse_params(
        {"message": {"messageId": "m1", "role": "ROLE_USER", "parts": [part]}}, a2a.SendMessageRequest()
    )
    assert parsed.message.parts[0].WhichOneof("content") == "text" and parsed.message.parts[0].text == "hi"
    alone = _parse_params({"message": {"messageId": "m2", "parts": [{"data": None}]}}, a2a.SendMessageRequest())
    assert alone.message.parts[0].WhichOneof("content") == "data"
