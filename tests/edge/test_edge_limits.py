"""The edge under slow and many clients: head, body and idle time bounds, the connection bound, header sizes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from agentvault_edge.settings import EdgeSettings

from .conftest import Backend, Recorder, edge_settings, start_edge

# Low bounds, so a slow client meets them quickly; CLOSE_WAIT only caps how long a test waits for the close.
BOUND = 0.5
CLOSE_WAIT = 10.0


@contextlib.asynccontextmanager
async def edge(backend: Backend, **overrides: Any) -> AsyncIterator[str]:
    runner, url = await start_edge(edge_settings(backend.address, **overrides))
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def slow_edge(backend: Backend) -> AsyncIterator[str]:
    # The idle bound far above the others, so that each close below is the head or body bound's.
    async with edge(backend, header_timeout=BOUND, body_timeout=BOUND, keepalive_timeout=60) as url:
        yield url


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parsed = URL(url)
    assert parsed.host is not None and parsed.port is not None
    return await asyncio.open_connection(parsed.host, parsed.port)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the edge sends until it closes the connection; fails if it keeps it open."""
    return await asyncio.wait_for(reader.read(), CLOSE_WAIT)


async def trickle(writer: asyncio.StreamWriter, data: bytes, interval: float) -> None:
    """Sends `data` a byte at a time, until the edge closes the connection."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval)


def error_of(raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), json.loads(body)["error"], headers


def reason(error: dict[str, Any]) -> str:
    return str(next(d["reason"] for d in error["details"] if d["@type"].endswith("ErrorInfo")))


async def test_a_connection_that_sends_nothing_is_closed(slow_edge: str) -> None:
    reader, writer = await open_raw(slow_edge)
    assert await until_closed(reader) == b""
    writer.close()


async def test_a_head_sent_slowly_gets_408_and_close(slow_edge: str) -> None:
    reader, writer = await open_raw(slow_edge)
    head = (
        b"GET /healthz HTTP/1.1\r\nHost: edge\r\n"
        + b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 20
    )
    sender = asyncio.create_task(trickle(writer, head, 0.01))
    raw = await until_closed(reader)
    sender.cancel()
    writer.close()
    status, error, headers = error_of(raw)
    assert (status, reason(error), headers["connection"]) == (408, "HEADER_TIMEOUT", "close")


@pytest.mark.parametrize("stop_after", [None, 10], ids=["one-byte-at-a-time", "short-body"])
async def test_a_body_that_does_not_arrive_in_time_gets_408_and_close(
    slow_edge: str, recorder: Recorder, stop_after: int | None
) -> None:
    reader, writer = await open_raw(slow_edge)
    body = json.dumps({"name": "x" * 200}).encode()
    writer.write(
        b"POST /api/v1/test/echo HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    await writer.drain()
    sender = asyncio.create_task(trickle(writer, body[:stop_after] if stop_after else body, 0.05))
    raw = await until_closed(reader)
    sender.cancel()
    writer.close()
    status, error, headers = error_of(raw)
    assert (status, reason(error), headers["connection"]) == (408, "BODY_TIMEOUT", "close")
    assert not [c for c in recorder.calls if c.method == "Echo"]


async def test_an_idle_keep_alive_connection_is_closed(backend: Backend) -> None:
    # A head timeout far above the idle one: the close below is the keep-alive bound's.
    async with edge(backend, header_timeout=60, keepalive_timeout=BOUND) as url:
        reader, writer = await open_raw(url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        assert await until_closed(reader) == b""
        writer.close()


async def test_connections_past_the_bound_are_answered_503(backend: Backend) -> None:
    async with edge(backend, header_timeout=60, max_connections=3) as url:
        held = [await open_raw(url) for _ in range(3)]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz") as resp:
                assert resp.status == 503
                assert resp.headers["Connection"] == "close" and resp.headers["Retry-After"] == "1"
                assert reason((await resp.json())["error"]) == "TOO_MANY_CONNECTIONS"
            # Once one of the held connections goes away, there is room again.
            held.pop()[1].close()
            for _ in range(200):
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("a connection slot was not freed")
        for _, writer in held:
            writer.close()


async def test_oversized_forwarded_headers_are_431_in_the_json_shape(
    http: aiohttp.ClientSession, recorder: Recorder
) -> None:
    # Each under aiohttp's per-field limit; together far past gRPC's metadata limit at the backend, which
    # used to answer 429 with gRPC's own text.
    big = {"Authorization": "Bearer " + "a" * 7000, "traceparent": "t" * 7000, "tracestate": "s" * 7000}
    async with http.get("/api/v1/test/things/x", headers=big) as resp:
        assert resp.status == 431
        error = (await resp.json())["error"]
    assert reason(error) == "HEADERS_TOO_LARGE"
    assert "metadata" not in error["message"].lower()
    assert not [c for c in recorder.calls if c.method == "GetThing"]


async def test_a_backend_transport_limit_is_not_shown_to_the_client(backend: Backend) -> None:
    # With the edge's own bound lifted, gRPC's limit at the backend trips: logged, not returned.
    async with edge(backend, max_forwarded_header_bytes=1_000_000) as url, aiohttp.ClientSession() as http:
        big = {"Authorization": "Bearer " + "a" * 7000, "traceparent": "t" * 7000, "tracestate": "s" * 7000}
        async with http.get(f"{url}/api/v1/test/things/x", headers=big) as resp:
            error = (await resp.json())["error"]
    assert reason(error) == "TRANSPORT_LIMIT", error
    assert "metadata" not in error["message"].lower() and "exceeds" not in error["message"].lower()


@pytest.mark.parametrize(
    "headers",
    [{"X-Long": "v" * 9000}, {f"X-Many-{i}": "v" for i in range(150)}],
    ids=["a-header-too-long", "too-many-headers"],
)
async def test_aiohttps_own_header_limits_answer_431_in_the_json_shape(edge_url: str, headers: dict[str, str]) -> None:
    reader, writer = await open_raw(edge_url)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: edge\r\n{lines}\r\n".encode())
    raw = await until_closed(reader)
    writer.close()
    status, error, _ = error_of(raw)
    # Closed (until_closed returned): aiohttp answers a head it could not parse as HTTP/1.0.
    assert (status, reason(error)) == (431, "HEADERS_TOO_LARGE")
    assert "vvvv" not in error["message"]


def test_the_bounds_are_settings() -> None:
    from agentvault.common.settings import Env

    defaults = EdgeSettings.load(env=Env({}))
    assert (defaults.header_timeout, defaults.body_timeout, defaults.keepalive_timeout) == (10.0, 30.0, 75.0)
    assert (defaults.max_connections, defaults.max_forwarded_header_bytes) == (1000, 6144)
    set_ = EdgeSettings.load(
        env=Env(
            {
                "EDGE_HEADER_TIMEOUT": "1.5",
                "EDGE_BODY_TIMEOUT": "2",
                "EDGE_KEEPALIVE_TIMEOUT": "3",
                "EDGE_MAX_CONNECTIONS": "4",
                "EDGE_MAX_FORWARDED_HEADER_BYTES": "4096",
            }
        )
    )
    assert (set_.header_timeout, set_.body_timeout, set_.keepalive_timeout, set_.max_connections) == (1.5, 2, 3, 4)
    assert set_.max_forwarded_header_bytes == 4096
