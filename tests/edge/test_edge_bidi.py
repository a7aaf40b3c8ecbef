"""Bidirectional-streaming RPCs at the edge: a WebSocket only, one JSON request per frame, closes that say why."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio

from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc

from .conftest import MAX_BODY, edge_settings, start_edge

PATH = "/api/v1/inbox:converse"
WAIT = 10.0
FLOOD = 800  # answers of 64 KiB each: 50 MiB, far more than every buffer on the way holds


@dataclass
class FakeConverse(mpb_grpc.MessagingServiceServicer):
    """Converse echoing each request as `done`; request ids steer it. Records metadata, requests and endings."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[mpb.ConverseRequest] = field(default_factory=list)
    ended: int = 0
    flooded: int = 0

    async def Converse(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        md = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.metadata.append(md)
        try:
            if md.get("authorization") != "Bearer good":
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "who are you")
            async for item in request_iterator:
                self.requests.append(item)
                if item.request_id == "fail":
                    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
                if item.request_id == "flood":
                    for i in range(FLOOD):
                        self.flooded = i + 1
                        yield mpb.ConverseResponse(request_id=f"{i:05d}" + "x" * 65_000)
                    continue
                yield mpb.ConverseResponse(request_id=item.request_id, done={})
            yield mpb.ConverseResponse(request_id="requests ended")
        finally:
            self.ended += 1


@dataclass
class Setup:
    url: str
    fake: FakeConverse
    runner: Any


async def _start(fake: FakeConverse) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    mpb_grpc.add_MessagingServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest_asyncio.fixture(loop_scope="session")
async def setup() -> AsyncIterator[Setup]:
    fake = FakeConverse()
    server, address = await _start(fake)
    runner, url = await start_edge(
        edge_settings(address, backends={"messaging": address}), [mpb.DESCRIPTOR.services_by_name["MessagingService"]]
    )
    yield Setup(url, fake, runner)
    await runner.cleanup()
    await server.stop(0)


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


GOOD = {"Authorization": "Bearer good"}


async def frame(ws: aiohttp.ClientWebSocketResponse) -> Any:
    msg = await asyncio.wait_for(ws.receive(), WAIT)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return json.loads(msg.data)


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    msg = await asyncio.wait_for(ws.receive(), WAIT)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (msg.type, msg.data)
    return ws.close_code, str(msg.extra or "")


async def until(predicate: Any, what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


async def test_frames_are_requests_and_answers_with_credentials_forwarded(
    setup: Setup, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(setup.url + PATH, headers={**GOOD, "X-Request-ID": "bidi-1"}) as ws:
        assert ws._response.headers["X-Request-ID"] == "bidi-1"
        await ws.send_str(json.dumps({"request_id": "one", "ack": {"message_id": "m", "receipt": "r"}}))
        assert (await frame(ws))["request_id"] == "one"
        # lowerCamel names, as in a request body.
        await ws.send_str(json.dumps({"requestId": "two", "subscribe": {"maxInFlight": 3}}))
        second = await frame(ws)
        assert second["request_id"] == "two" and second["done"] == {}
        # An empty frame ends the requests; the answers go on until the call ends, OK: a normal close.
        await ws.send_str("")
        assert (await frame(ws))["request_id"] == "requests ended"
        assert (await closed(ws))[0] == 1000
    assert setup.fake.metadata[-1]["authorization"] == "Bearer good"
    assert setup.fake.metadata[-1]["x-request-id"] == "bidi-1"
    assert [r.request_id for r in setup.fake.requests[-2:]] == ["one", "two"]
    assert setup.fake.requests[-1].subscribe.max_in_flight == 3


async def test_a_failed_call_sends_its_error_then_closes_1011(setup: Setup, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(setup.url + PATH, headers=GOOD) as ws:
        await ws.send_str(json.dumps({"request_id": "fail"}))
        error = (await frame(ws))["error"]
        assert (error["code"], error["status"], error["message"]) == (404, "NOT_FOUND", "no such thing")
        assert await closed(ws) == (1011, "NOT_FOUND")
    async with http.ws_connect(setup.url + PATH) as ws:
        error = (await frame(ws))["error"]
        assert (error["code"], error["status"]) == (401, "UNAUTHENTICATED")
        assert await closed(ws) == (1011, "UNAUTHENTICATED")


@pytest.mark.parametrize(
    ("send", "code", "field"),
    [
        ("{", 1007, ""),
        ('{"request_id": "a", "request_id": "b"}', 1007, "request_id"),
        ('{"ack": {"receipt": 5}}', 1007, "ack.receipt"),
        ('{"nope": 1}', 1007, "nope"),
        ("null", 1007, ""),
        (b'{"request_id": "bin"}', 1003, ""),
    ],
)
async def test_a_bad_frame_gets_an_error_frame_then_the_close(
    setup: Setup, http: aiohttp.ClientSession, send: str | bytes, code: int, field: str
) -> None:
    async with http.ws_connect(setup.url + PATH, headers=GOOD) as ws:
        await (ws.send_bytes(send) if isinstance(send, bytes) else ws.send_str(send))
        error = (await frame(ws))["error"]
        assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT"), error
        (bad_request,) = [d for d in error["details"] if d["@type"].endswith("BadRequest")]
        assert bad_request["field_violations"][0]["field"] == field
        assert await closed(ws) == (code, "INVALID_ARGUMENT")
    # The call is cancelled (it may even be cancelled before the backend saw it start): none is left running.
    await until(lambda: setup.fake.ended == len(setup.fake.metadata), "the call to be cancelled")


async def test_a_frame_over_the_body_bound_closes_1009_and_one_after_the_end_1008(
    setup: Setup, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(setup.url + PATH, headers=GOOD) as ws:
        await ws.send_str(json.dumps({"request_id": "x" * MAX_BODY}))
        assert (await closed(ws))[0] == 1009
    async with http.ws_connect(setup.url + PATH, headers=GOOD) as ws:
        await ws.send_str("")
        assert (await frame(ws))["request_id"] == "requests ended"
        # The call has ended: a late frame is dropped, and the socket closes normally.
        await ws.send_str(json.dumps({"request_id": "late"}))
        assert (await closed(ws))[0] == 1000
    assert "late" not in [r.request_id for r in setup.fake.requests]


async def test_only_a_websocket_is_served(setup: Setup, http: aiohttp.ClientSession) -> None:
    async with http.get(setup.url + PATH, headers=GOOD) as resp:
        assert resp.status == 426 and resp.headers["Upgrade"] == "websocket"
        error = (await resp.json())["error"]
        assert error["status"] == "INVALID_ARGUMENT" and "Upgrade: websocket" in error["message"]
    async with http.post(setup.url + PATH, headers=GOOD, json={}) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET"
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(setup.url + PATH + "?request_id=x", headers=GOOD)
    assert caught.value.status == 400


async def test_the_client_closing_cancels_the_call(setup: Setup, http: aiohttp.ClientSession) -> None:
    ended = setup.fake.ended
    ws = await http.ws_connect(setup.url + PATH, headers=GOOD)
    await ws.send_str(json.dumps({"request_id": "hello"}))
    assert (await frame(ws))["request_id"] == "hello"
    assert setup.fake.ended == ended
    await asyncio.wait_for(ws.close(), WAIT)
    await until(lambda: setup.fake.ended > ended, "the call to be cancelled")


async def test_answers_wait_for_a_slow_reader(setup: Setup, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(setup.url + PATH, headers=GOOD, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"request_id": "flood"}))
        # The client reads nothing: the backend is held back once the buffers on the way are full.
        stable, last = 0, -1
        while stable < 20:
            await asyncio.sleep(0.05)
            stable, last = (stable + 1, last) if setup.fake.flooded == last else (0, setup.fake.flooded)
        assert 0 < setup.fake.flooded < FLOOD, setup.fake.flooded
        # Reading resumes the flow, in order and complete.
        for i in range(FLOOD):
            assert (await frame(ws))["request_id"].startswith(f"{i:05d}")


async def test_shutdown_closes_the_socket_1001(http: aiohttp.ClientSession) -> None:
    fake = FakeConverse()
    server, address = await _start(fake)
    runner, url = await start_edge(
        edge_settings(address, backends={"messaging": address}), [mpb.DESCRIPTOR.services_by_name["MessagingService"]]
    )
    try:
        ws = await http.ws_connect(url + PATH, headers=GOOD)
        await ws.send_str(json.dumps({"request_id": "before"}))
        assert (await frame(ws))["request_id"] == "before"
        shutdown = asyncio.create_task(runner.shutdown_gracefully(WAIT))
        assert (await closed(ws))[0] == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(shutdown, WAIT)
        await until(lambda: fake.ended == 1, "the call to be cancelled")
    finally:
        await runner.cleanup()
        await server.stop(0)
