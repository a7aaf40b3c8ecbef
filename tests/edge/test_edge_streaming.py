"""Server-streaming RPCs over HTTP: Server-Sent Events, and WebSocket on an Upgrade; plus the test API's routes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .conftest import Recorder


async def _sse_events(resp: aiohttp.ClientResponse) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    kind = "message"
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((kind, json.loads(line.removeprefix("data: "))))
            kind = "message"
    return events


async def test_server_stream_as_sse(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/test/watch/topic-a", params={"small": "3", "color": "red"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Request-ID"]
        events = await _sse_events(resp)
    assert [kind for kind, _ in events] == ["message"] * 3
    assert [e["probe"]["big"] for _, e in events] == [0, 1, 2]
    assert {e["probe"]["color"] for _, e in events} == {"red"}
    assert recorder.last("Watch").request.name == "topic-a"


async def test_stream_failing_before_the_first_message_is_a_plain_http_error(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/test/watch/missing", params={"small": "1"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["status"] == "NOT_FOUND"


async def test_stream_failing_midway_sends_an_error_event(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/test/watch/broken", params={"small": "2"}) as resp:
        assert resp.status == 200
        events = await _sse_events(resp)
    assert [kind for kind, _ in events] == ["message", "message", "error"]
    assert events[-1][1]["error"] == {"code": 500, "status": "DATA_LOSS", "message": "stream broke", "details": []}


async def test_server_stream_as_websocket(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.ws_connect("/api/v1/test/watch/ws-topic?small=2&color=deep_blue") as ws:
        frames = [json.loads(msg.data) async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    assert [f["probe"]["big"] for f in frames] == [0, 1]
    assert frames[0]["probe"]["color"] == "deep_blue"
    assert ws.close_code == 1000
    assert recorder.last("Watch").request.name == "ws-topic"


async def _started(recorder: Recorder, name: str) -> bool:
    for _ in range(100):
        if any(call.method == "Watch" and call.request.name == name for call in recorder.calls):  # type: ignore[attr-defined]
            return True
        await asyncio.sleep(0.05)
    return False


async def _ended(recorder: Recorder, name: str) -> bool:
    for _ in range(100):
        if name in recorder.ended_streams:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_websocket_client_closing_cancels_the_backend_stream(
    http: aiohttp.ClientSession, recorder: Recorder
) -> None:
    ws = await http.ws_connect("/api/v1/test/watch/forever-ws?small=1&flag=true")
    first = await asyncio.wait_for(ws.receive(), 5)
    assert json.loads(first.data)["probe"]["name"] == "forever-ws"
    assert "forever-ws" not in recorder.ended_streams
    await asyncio.wait_for(ws.close(), 5)
    assert await _ended(recorder, "forever-ws")


async def test_sse_client_leaving_cancels_the_backend_stream(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/test/watch/forever-sse", params={"small": "1", "flag": "true"}) as resp:
        line = await asyncio.wait_for(resp.content.readline(), 5)
        assert line.startswith(b"data: ")
        # A quiet stream still sends keepalive comments.
        assert await asyncio.wait_for(resp.content.readuntil(b": keepalive\n\n"), 5)
    assert await _ended(recorder, "forever-sse")


async def test_stream_with_no_first_message_still_starts(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/test/watch/silent", params={"small": "0", "flag": "true"}) as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readuntil(b": keepalive\n\n"), 5)
    assert await _ended(recorder, "silent")
    async with http.ws_connect("/api/v1/test/watch/silent-ws?flag=true") as ws:
        # The backend stream started although it has sent nothing, and the socket stays open meanwhile.
        assert await _started(recorder, "silent-ws")
        assert not ws.closed
    assert await _ended(recorder, "silent-ws")
    async with http.get("/healthz") as resp:
        assert resp.status == 200


async def test_response_body_and_nested_int64_path_variables(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.get("/api/v1/test/nested/some%20note/-42", params={"inner.level": "3"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    # response_body: "probe" returns that field only.
    assert body["name"] == "" and body["big"] == -42
    assert body["inner"] == {"note": "some note", "level": 3, "color": "unspecified"}
    async with http.get("/api/v1/test/nested/x/not-a-number") as resp:
        assert resp.status == 400
        assert "big" in (await resp.json())["error"]["message"]


async def test_literal_and_verb_routes_over_http(http: aiohttp.ClientSession) -> None:
    for path, method in [
        ("/api/v1/test/things/special", "Special"),
        ("/api/v1/test/things/thing-1", "GetThing"),
        ("/api/v1/test/things:search", "SearchThings"),
        ("/api/v1/test/files/a/b/c.txt", "Files"),
    ]:
        async with http.get(path) as resp:
            assert resp.status == 200, path
            assert (await resp.json())["method"] == method
    async with http.get("/api/v1/test/files/a/b/c.txt") as resp:
        assert (await resp.json())["probe"]["name"] == "a/b/c.txt"


async def test_body_field_that_is_a_nested_message(http: aiohttp.ClientSession, recorder: Recorder) -> None:
    async with http.put("/api/v1/test/echo/inner?name=n&tags=a&tags=b", json={"note": "x", "color": "red"}) as resp:
        assert resp.status == 200, await resp.text()
    request = recorder.last("Echo").request
    assert (request.inner.note, request.inner.color, request.name, list(request.tags)) == ("x", 1, "n", ["a", "b"])
