"""`python -m bench.healthmonitor_bench`: one round of health checks over 1,000 simulated peers on loopback.

The peers are real servers in a few processes: gRPC peers (grpc.health.v1 + FederationService.GetFederationInfo)
and REST peers (GET /api/v1/health), each peer on its own port so every check is its own TCP connection, as it
is against real meshes. Some answer slowly (under the check timeout), some hang (past it), some ports are dead.
A registry and one health-monitor run as real processes on embedded PostgreSQL and Redis; the figures are the
round's duration (first claim to last result) and the monitor's CPU and memory from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.federation.v1 import federation_service_pb2_grpc as fed_grpc
from bench.procs import cpu_seconds, machine, sigterm_as_interrupt

FEDERATION_SERVICE = fed_pb.DESCRIPTOR.services_by_name["FederationService"].full_name
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    """How many peers of each kind, per simulator process."""

    grpc_processes: int = 2
    http_processes: int = 2
    fast_per_process: int = 220
    slow_per_process: int = 20
    hang_per_process: int = 5
    dead: int = 20
    slow_seconds: float = 1.5
    hang_seconds: float = 60.0

    @property
    def per_process(self) -> int:
        return self.fast_per_process + self.slow_per_process + self.hang_per_process

    @property
    def total(self) -> int:
        return (self.grpc_processes + self.http_processes) * self.per_process + self.dead


# ------------------------------------------------------------------------------------ simulated peers


class _Federation(fed_grpc.FederationServiceServicer):
    async def GetFederationInfo(
        self, request: fed_pb.GetFederationInfoRequest, context: grpc.aio.ServicerContext
    ) -> fed_pb.FederationInfo:
        return fed_pb.FederationInfo(registry_name="sim", protocol="agentvault-grpc/v1", agent_count=42)

    async def SearchAgents(
        self, request: fed_pb.SearchAgentsRequest, context: grpc.aio.ServicerContext
    ) -> fed_pb.SearchAgentsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a simulated peer only answers health checks")
        raise AssertionError("unreachable")


class _SlowHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.sleep(self.delay)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _grpc_peers(plan: Plan) -> tuple[list[grpc.aio.Server], dict[str, list[int]]]:
    """One server per behaviour, each listening on many ports: a port is a peer."""
    servers: list[grpc.aio.Server] = []
    ports: dict[str, list[int]] = {}
    for kind, count, delay in (
        ("fast", plan.fast_per_process, 0.0),
        ("slow", plan.slow_per_process, plan.slow_seconds),
        ("hang", plan.hang_per_process, plan.hang_seconds),
    ):
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        fed_grpc.add_FederationServiceServicer_to_server(_Federation(), server)
        if delay:
            health_pb2_grpc.add_HealthServicer_to_server(_SlowHealth(delay), server)
        else:
            servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            await servicer.set(FEDERATION_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        ports[kind] = [server.add_insecure_port("127.0.0.1:0") for _ in range(count)]
        await server.start()
        servers.append(server)
    return servers, ports


async def _http_peers(plan: Plan) -> tuple[list[web.AppRunner], dict[str, list[int]]]:
    runners: list[web.AppRunner] = []
    ports: dict[str, list[int]] = {}
    for kind, count, delay in (
        ("fast", plan.fast_per_process, 0.0),
        ("slow", plan.slow_per_process, plan.slow_seconds),
        ("hang", plan.hang_per_process, plan.hang_seconds),
    ):

        async def answer(request: web.Request, delay: float = delay) -> web.Response:
            if delay:
                await asyncio.sleep(delay)
            return web.json_response({"status": "healthy", "agent_count": 42})

        app = web.Application()
        app.router.add_get("/api/v1/health", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ports[kind] = []
        for _ in range(count):
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=512)
            await site.start()
            ports[kind].append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        runners.append(runner)
    return runners, ports


def _simulate(kind: str, plan: Plan, conn: Connection) -> None:
    """A simulator process: serves its peers and sends their ports, then serves until told to stop."""

    async def main() -> None:
        if kind == "grpc":
            _servers, ports = await _grpc_peers(plan)  # held so the servers live
        else:
            _runners, ports = await _http_peers(plan)
        conn.send(ports)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@contextlib.contextmanager
def simulators(plan: Plan) -> Iterator[tuple[dict[str, dict[str, list[int]]], list[int]]]:
    """Starts the simulator processes; yields ports by protocol and behaviour, and their pids."""
    # spawn, not fork: gRPC's threads do not survive fork.
    context = multiprocessing.get_context("spawn")
    started: list[tuple[Any, Connection]] = []
    found: dict[str, dict[str, list[int]]] = {"grpc": {}, "http": {}}
    try:
        for kind, count in (("grpc", plan.grpc_processes), ("http", plan.http_processes)):
            for _ in range(count):
                parent, child = context.Pipe()
                process = context.Process(target=_simulate, args=(kind, plan, child), daemon=True)
                process.start()
                started.append((process, parent))
                for behaviour, ports in parent.recv().items():
                    found[kind].setdefault(behaviour, []).extend(ports)
        yield found, [p.pid for p, _ in started if p.pid is not None]
    finally:
        for process, parent in started:
            with contextlib.suppress(OSError):
                parent.send("stop")
            process.join(5)
            if process.is_alive():
                process.kill()


# ----------------------------------------------------------------------------------------- the run


def memory(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process, MiB, from /proc/<pid>/status."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = round(int(value.split()[0]) / 1024, 1)
    return found


async def register_peers(address: str, token: str, peers: list[fed_pb.Peer]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fed_grpc.PeerServiceStub(channel)
        semaphore = asyncio.Semaphore(32)

        async def create(peer: fed_pb.Peer) -> None:
            async with semaphore:
                await stub.CreatePeer(
                    fed_pb.CreatePeerRequest(peer=peer), metadata=(("authorization", f"Bearer {token}"),), timeout=30
                )

        await asyncio.gather(*(create(p) for p in peers))


def peer_list(ports: dict[str, dict[str, list[int]]], dead: list[int]) -> list[fed_pb.Peer]:
    peers = []
    for behaviour, numbers in ports["grpc"].items():
        for port in numbers:
            peers.append(
                fed_pb.Peer(
                    name=f"grpc-{behaviour}-{port}",
                    registry_url=f"http://127.0.0.1:{port}",
                    api_key="sim",
                    protocol=fed_pb.PEER_PROTOCOL_GRPC,
                    grpc_endpoint=f"127.0.0.1:{port}",
                )
            )
    for behaviour, numbers in ports["http"].items():
        for port in numbers:
            peers.append(
                fed_pb.Peer(
                    name=f"rest-{behaviour}-{port}",
                    registry_url=f"http://127.0.0.1:{port}",
                    api_key="sim",
                    protocol=fed_pb.PEER_PROTOCOL_REST,
                )
            )
    # Dead peers are left to discovery (protocol unspecified): the first thing that fails is the discovery GET.
    peers.extend(
        fed_pb.Peer(name=f"dead-{port}", registry_url=f"http://127.0.0.1:{port}", api_key="sim") for port in dead
    )
    return peers


async def measure(mesh: Mesh, dsn: str, total: int, rounds: int, sim_pids: list[int]) -> dict[str, Any]:
    """Starts the monitor and follows `rounds` rounds through its history table."""
    conn = await asyncpg.connect(dsn)
    try:
        await asyncio.to_thread(mesh.start_service, "health-monitor")
        pid = mesh.processes["health-monitor"].pid
        cpu_start, wall_start = cpu_seconds(pid), time.monotonic()
        sims_start = sum(cpu_seconds(p) for p in sim_pids)
        results: list[dict[str, Any]] = []
        for number in range(1, rounds + 1):
            # Round n is every peer's n-th check.
            while True:
                done = await conn.fetchval(
                    """SELECT count(*) FROM (SELECT subject_id FROM health_checks WHERE subject_kind = 'peer'
                       GROUP BY subject_id HAVING count(*) >= $1) s""",
                    number,
                )
                if done >= total:
                    break
                await asyncio.sleep(0.05)
            row = await conn.fetchrow(
                """WITH nth AS (
                       SELECT checked_at, response_time_ms, row_number() OVER (
                           PARTITION BY subject_id ORDER BY checked_at) AS n
                       FROM health_checks WHERE subject_kind = 'peer')
                   SELECT extract(epoch FROM max(checked_at + make_interval(secs => response_time_ms / 1000))
                                              - min(checked_at)) AS seconds,
                          max(response_time_ms) AS slowest_ms
                   FROM nth WHERE n = $1""",
                number,
            )
            cpu, wall = cpu_seconds(pid), time.monotonic()
            results.append(
                {
                    "round": number,
                    "duration_s": round(float(row["seconds"]), 2),
                    "slowest_check_ms": round(float(row["slowest_ms"]), 1),
                    "monitor_cpu_s_so_far": round(cpu - cpu_start, 2),
                    "monitor_memory_mib": memory(pid),
                    "elapsed_s": round(wall - wall_start, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
        statuses = dict(await conn.fetch("SELECT status, count(*) FROM health_state GROUP BY status"))
        cpu_total = cpu_seconds(pid) - cpu_start
        wall_total = time.monotonic() - wall_start
        return {
            "rounds": results,
            "statuses": statuses,
            "monitor_cpu_seconds": round(cpu_total, 2),
            "monitor_cpu_percent_of_one_core": round(100 * cpu_total / wall_total, 1),
            "monitor_wall_seconds": round(wall_total, 1),
            "monitor_memory_mib": memory(pid),
            "simulators_cpu_seconds": round(sum(cpu_seconds(p) for p in sim_pids) - sims_start, 2),
        }
    finally:
        await conn.close()


def run(plan: Plan, rounds: int, interval: float, timeout: float, concurrency: int, output: Path | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="hm-bench-"))
    postgres = EmbeddedPostgres(root / "pg", delete_on_stop=True)
    redis = EmbeddedRedis(root / "redis")
    mesh: Mesh | None = None
    try:
        postgres.start()
        redis_url = redis.start()
        asyncio.run(_create_database(postgres.uri(), "hmbench"))
        dsn = postgres.uri("hmbench")
        token = "bench-admin-" + secrets.token_urlsafe(12)
        specs = tuple(s for s in SERVICES if s.name in ("registry", "health-monitor"))
        env = {
            "DATABASE_URL": dsn,
            "REDIS_URL": redis_url,
            "AGENTVAULT_ADMIN_TOKEN": token,
            "AGENTVAULT_DATA_DIR": str(root / "data"),
            "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
            "FEDERATION_HEALTH_CHECK_INTERVAL": str(interval),
            "HEALTH_CHECK_TIMEOUT": str(timeout),
            "HEALTH_CHECK_CONCURRENCY": str(concurrency),
            "LOG_FORMAT": "text",
            "LOG_LEVEL": "WARNING",
        }
        mesh = Mesh(env=env, log_dir=root / "logs", services=specs)
        with simulators(plan) as (ports, sim_pids):
            dead = [free_port() for _ in range(plan.dead)]
            peers = peer_list(ports, dead)
            mesh.start_service("registry")
            asyncio.run(register_peers(mesh.address("registry"), token, peers))
            print(f"{len(peers)} peers registered; starting the monitor", flush=True)
            figures = asyncio.run(measure(mesh, dsn, len(peers), rounds, sim_pids))
        report = {
            "benchmark": "health-monitor round",
            "peers": len(peers),
            "plan": asdict(plan),
            "settings": {"interval_s": interval, "timeout_s": timeout, "concurrency": concurrency},
            **figures,
            "round_within_interval": all(r["duration_s"] < interval for r in figures["rounds"]),
            "machine": machine(),
        }
        print(json.dumps(report, indent=2))
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=2))
        return 0 if report["round_within_interval"] else 1
    finally:
        if mesh is not None:
            mesh.stop()
        redis.stop()
        postgres.stop()


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.healthmonitor_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="rounds to follow (default 2)")
    parser.add_argument("--interval", type=float, default=60.0, help="FEDERATION_HEALTH_CHECK_INTERVAL (default 60)")
    parser.add_argument("--timeout", type=float, default=5.0, help="HEALTH_CHECK_TIMEOUT (default 5)")
    parser.add_argument("--concurrency", type=int, default=100, help="HEALTH_CHECK_CONCURRENCY (default 100)")
    parser.add_argument("--quick", action="store_true", help="one round of 200 peers")
    parser.add_argument("--output", type=Path, default=REPO / ".build" / "bench" / "healthmonitor.json")
    args = parser.parse_args(argv)
    plan = Plan(fast_per_process=40, slow_per_process=5, hang_per_process=3, dead=8) if args.quick else Plan()
    rounds = 1 if args.quick else args.rounds
    with sigterm_as_interrupt():
        sys.exit(run(plan, rounds, args.interval, args.timeout, args.concurrency, args.output))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
