"""The `agentvault-edge` process: starts from the environment, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
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
