"""Graceful shutdown of the edge: requests in flight finish, new ones are refused, streams are told to close."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from agentvault_edge.server import DRAIN_KEY, EdgeRequestHandler, EdgeRunner

from .conftest import Backend, Recorder, edge_settings, start_edge
from .test_edge_limits import CLOSE_WAIT, error_of, open_raw, reason, until_closed

GRACE = 10.0


def busy_connections(runner: EdgeRunner) -> int:
    assert runner.server is not None
    return sum(1 for c in runner.server.connections if isinstance(c, EdgeRequestHandler) and c.busy)


async def until(predicate: object, what: str) -> None:
    for _ in range(400):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


async def refused(url: str) -> bool:
    try:
        _, writer = await open_raw(url)
    except ConnectionError:  # refused, or reset when the listener closed with it still queued
        return True
    writer.close()
    return False


async def test_shutdown_finishes_requests_in_flight_and_closes_streams(backend: Backend, recorder: Recorder) -> None:
    runner, url = await start_edge(edge_settings(backend.address))
    async with aiohttp.ClientSession() as http:
        # An idle keep-alive connection, between requests.
        idle_reader, idle_writer = await open_raw(url)
        idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        head = await idle_reader.readuntil(b"\r\n\r\n")
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        await idle_reader.readexactly(length)

        # An upload whose body is still on its way.
        body = json.dumps({"name": "uploaded during shutdown"}).encode()
        up_reader, up_writer = await open_raw(url)
        up_writer.write(
            b"POST /api/v1/test/echo HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        await up_writer.drain()

        sse = await http.get(f"{url}/api/v1/test/watch/sse-at-shutdown", params={"small": "1", "flag": "true"})
        assert (await asyncio.wait_for(sse.content.readline(), CLOSE_WAIT)).startswith(b"data: ")
        ws = await http.ws_connect(f"{url}/api/v1/test/watch/ws-at-shutdown?small=1&flag=true")
        assert json.loads((await asyncio.wait_for(ws.receive(), CLOSE_WAIT)).data)["probe"]["name"] == "ws-at-shutdown"
        await until(lambda: busy_connections(runner) == 3, "the upload and both streams to be in flight")

        shutdown = asyncio.create_task(runner.shutdown_gracefully(GRACE))

        # New connections are not accepted; the idle keep-alive one is closed without a response.
        for _ in range(400):
            if await refused(url):
                break
            await asyncio.sleep(0.025)
        else:
            raise AssertionError("the edge still accepts connections")
        assert await until_closed(idle_reader) == b""

        # The SSE stream ends with an event saying why and when to reconnect; the WebSocket closes 1001.
        rest = await asyncio.wait_for(sse.content.read(), CLOSE_WAIT)
        assert b"retry: 1000\nevent: close\ndata: " in rest, rest
        close_event = json.loads(rest.split(b"event: close\ndata: ")[1].split(b"\n")[0])
        assert reason(close_event["error"]) == "SHUTTING_DOWN"
        closing = await asyncio.wait_for(ws.receive(), CLOSE_WAIT)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.GOING_AWAY
        sse.release()
        await ws.close()

        # The upload's body arrives within the grace: it is answered in full, and told the connection closes.
        assert not shutdown.done()
        up_writer.write(body[5:])
        raw = await until_closed(up_reader)
        head, _, answer = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head, head
        assert json.loads(answer)["probe"]["name"] == "uploaded during shutdown"
        assert recorder.last("Echo").request.name == "uploaded during shutdown"

        await asyncio.wait_for(shutdown, GRACE)
        for writer in (idle_writer, up_writer):
            writer.close()


async def test_a_request_arriving_while_draining_is_refused_cleanly(backend: Backend) -> None:
    runner, url = await start_edge(edge_settings(backend.address))
    try:
        reader, writer = await open_raw(url)
        runner.app[DRAIN_KEY].begin()
        writer.write(b"GET /api/v1/test/things/x HTTP/1.1\r\nHost: edge\r\n\r\n")
        status, error, headers = error_of(await until_closed(reader))
        writer.close()
        assert (status, reason(error), headers["connection"], headers["retry-after"]) == (
            503,
            "SHUTTING_DOWN",
            "close",
            "1",
        )
    finally:
        await runner.cleanup()


async def test_requests_still_running_after_the_grace_are_cancelled(backend: Backend) -> None:
    runner, url = await start_edge(edge_settings(backend.address))
    async with aiohttp.ClientSession() as http:
        # The fake registry's "slow" page takes 3 s; a grace of 0.2 s does not wait for it.
        slow = asyncio.create_task(http.get(f"{url}/api/v1/agents", params={"page_token": "slow"}))
        await until(lambda: busy_connections(runner) == 1, "the slow request to be in flight")
        await asyncio.wait_for(runner.shutdown_gracefully(0.2), CLOSE_WAIT)
        (outcome,) = await asyncio.wait_for(asyncio.gather(slow, return_exceptions=True), CLOSE_WAIT)
        assert isinstance(outcome, aiohttp.ClientConnectionError), outcome
