"""grpc.health.v1: the store watch that sets a server's status, and `python -m agentvault.common.healthcheck`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1

# One ping may take this long before its store counts as unreachable.
STORE_PING_TIMEOUT = 2.0
# The health name a liveness probe asks for: SERVING while the process runs, whatever its stores do, so an
# outage of PostgreSQL or Redis takes replicas out of rotation (readiness, the server's "" status) without
# getting them restarted.
LIVENESS_SERVICE = "liveness"


class StoreWatch:
    """Pings PostgreSQL and Redis every `interval` on connections of its own (a busy pool must not read as an
    outage) and reports each change: `on_change(True, "")` when every store answers again, `on_change(False,
    why)` when one stops answering. Readiness follows the stores; liveness (the process) is another matter."""

    def __init__(
        self,
        database_url: str | None,
        redis_url: str | None,
        on_change: Callable[[bool, str], Awaitable[None]],
        interval: float,
        timeout: float = STORE_PING_TIMEOUT,
    ) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.on_change = on_change
        self.interval = interval
        self.timeout = timeout
        self.healthy = True  # the server starts SERVING: its stores answered while it started
        self._conn: Any = None  # asyncpg.Connection
        self._redis: Any = None  # redis.asyncio.Redis

    async def problems(self) -> list[str]:
        """What does not answer now, one entry per store; empty when all do."""
        found = []
        if self.database_url:
            try:
                await self._ping_postgres()
            except Exception as exc:  # any failure to answer SELECT 1 is an outage for readiness
                await self._drop_postgres()
                found.append(f"postgres: {type(exc).__name__}: {exc}")
        if self.redis_url:
            try:
                await asyncio.wait_for(self._ping_redis(), self.timeout)
            except Exception as exc:
                found.append(f"redis: {type(exc).__name__}: {exc}")
        return found

    async def _ping_postgres(self) -> None:
        import asyncpg

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.database_url, timeout=self.timeout)
        await self._conn.fetchval("SELECT 1", timeout=self.timeout)

    async def _drop_postgres(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _ping_redis(self) -> None:
        if self._redis is None:
            from agentvault.common.redis import create_redis

            self._redis = create_redis(self.redis_url or "", timeout=self.timeout)
        await self._redis.ping()

    async def run(self) -> None:
        try:
            while True:
                found = await self.problems()
                healthy = not found
                if healthy != self.healthy:
                    self.healthy = healthy
                    if healthy:
                        log.info("stores answer again: serving")
                    else:
                        log.warning("store unreachable: not serving (%s)", "; ".join(found))
                    await self.on_change(healthy, "; ".join(found))
                await asyncio.sleep(self.interval)
        finally:
            await self.close()

    async def close(self) -> None:
        await self._drop_postgres()
        redis, self._redis = self._redis, None
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Calls Health/Check once on `target`; returns (serving, one-line description)."""
    label = f"{target} service={service or '<server>'}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return False, f"{label}: {name}: {detail}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{label}: {status}"


def _positive(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentvault.common.healthcheck",
        description="Exit 0 if the gRPC server reports SERVING (grpc.health.v1 Check), else 1.",
    )
    parser.add_argument("target", help="HOST:PORT of the gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=_positive, default=3.0, help="deadline in seconds (default: 3)")
    args = parser.parse_args(argv)
    serving, line = check(args.target, args.service, args.timeout)
    print(line, file=sys.stdout if serving else sys.stderr, flush=True)
    return EXIT_SERVING if serving else EXIT_UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
