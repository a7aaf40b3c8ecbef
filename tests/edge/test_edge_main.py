"""The `agentvault-edge` process: starts from the environment, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp

from agentvault.devserver.embedded import free_port


async def test_process_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    dead = free_port()
    env = {
        **os.environ,
        "EDGE_PORT": str(port),
        "AGENTVAULT_BIND_HOST": "127.0.0.1",
        "LOG_FORMAT": "json",
        # Every backend points at a closed port: the edge must start anyway and report not ready.
        **{
            var: f"127.0.0.1:{dead}"
            for var in ("REGISTRY_ADDR", "DISCOVERY_ADDR", "HEALTH_MONITOR_ADDR", "MESSAGING_ADDR")
        },
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentvault_edge", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):
                try:
                    async with http.get("/healthz") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the edge did not start")
            async with http.get("/readyz") as resp:
                assert resp.status == 503
            async with http.get("/api/v1/health") as resp:
                assert resp.status == 503
            async with http.get("/api/v1/openapi.json") as resp:
                assert "/api/v1/agents" in (await resp.json())["paths"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        logs = (await proc.stderr.read()).decode()
        assert '"msg": "edge listening"' in logs
        assert '"msg": "edge shutting down"' in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_settings_fail_at_start_with_a_clear_message() -> None:
    env = {**os.environ, "EDGE_MAX_BODY_BYTES": "lots"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentvault_edge", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"EDGE_MAX_BODY_BYTES must be an integer" in err


async def test_sigterm_answers_an_upload_whose_body_arrives_within_the_grace() -> None:
    port = free_port()
    dead = free_port()
    env = {
        **os.environ,
        "EDGE_PORT": str(port),
        "SHUTDOWN_GRACE_SECONDS": "20",
        **{
            var: f"127.0.0.1:{dead}"
            for var in ("REGISTRY_ADDR", "DISCOVERY_ADDR", "HEALTH_MONITOR_ADDR", "MESSAGING_ADDR")
        },
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agentvault_edge", env=env)
    writer: asyncio.StreamWriter | None = None
    try:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except ConnectionError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the edge did not start")
        body = json.dumps({"did": "did:web:example.com:a", "name": "a", "version": "1.0.0"}).encode()
        writer.write(
            b"POST /api/v1/agents HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        await writer.drain()
        proc.send_signal(signal.SIGTERM)
        # Once the edge no longer accepts connections it is draining; only then does the rest of the body go.
        for _ in range(200):
            try:
                _, probe = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionError:
                break
            probe.close()
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the edge kept accepting connections after SIGTERM")
        assert proc.returncode is None
        writer.write(body[10:])
        raw = await asyncio.wait_for(reader.read(), 15)
        head, _, answer = raw.partition(b"\r\n\r\n")
        # The backends are down, so the answer is theirs (503), but it is a whole answer, not a dropped one.
        assert head.startswith(b"HTTP/1.1 503") and b"Connection: close" in head, raw
        assert json.loads(answer)["error"]["status"] == "UNAVAILABLE"
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if writer is not None:
            writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
