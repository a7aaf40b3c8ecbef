"""`python -m bench.getagent_profile`: GetAgent against the echo ceiling at one population, in interleaved rounds.

Seeds the population once (100k by default), starts the registry, warms its cache with every id of the workload,
then alternates echo and GetAgent measurements so both see the same machine; with --py-spy it also records a flame
graph of the registry during one GetAgent round (py-spy from the venv, sampling the registry's process).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from grpc_health.v1.health_pb2 import HealthCheckRequest

from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from bench import dataset
from bench.load import LoadClient
from bench.procs import pinned, sigterm_as_interrupt
from bench.report import GET_AGENT_VS_ECHO, Figure
from bench.suite import (
    GET_METHOD,
    REPO,
    Ceilings,
    Config,
    Runner,
    _create_database,
    build_workloads,
    cache_lookups,
    infrastructure,
    read_once,
    registry_env,
    seed_to,
)

HEALTH_METHOD = "/grpc.health.v1.Health/Check"


def parse(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.getagent_profile", description=__doc__)
    parser.add_argument("--size", type=int, default=100_000, help="agents (default 100000)")
    parser.add_argument("--rounds", type=int, default=4, help="echo/GetAgent pairs (default 4)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement (default 6)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--py-spy", type=Path, help="write a flame graph (SVG) of the registry during one round")
    parser.add_argument("--cache-ttl", help="REGISTRY_AGENT_CACHE_TTL for the registry (default: its own, 30 s)")
    parser.add_argument("--health", action="store_true", help="also measure the registry's health Check")
    parser.add_argument("--native", action="store_true", help="py-spy: include native (C) frames")
    args = parser.parse_args(argv)
    available = sorted(os.sched_getaffinity(0))
    pin = len(available) >= 2
    config = Config(
        quick=False,
        sizes=(args.size,),
        warmup=1.0,
        duration=args.duration,
        concurrency=args.concurrency,
        channels=4,
        server_cpus=frozenset({available[0]}) if pin else None,
        client_cpus=frozenset({available[-1]}) if pin else None,
        output=REPO / ".build" / "bench" / "getagent.json",
        edge=False,
    )
    return config, args


def cpu_us(figure: Figure) -> float:
    """Microseconds of the server process's CPU per answered call (robust to other work on the machine)."""
    return figure.cpu.get("server", 0.0) / 100 / max(figure.throughput or 1.0, 1.0) * 1e6


def run(config: Config, args: argparse.Namespace) -> int:
    client = LoadClient(set(config.client_cpus) if config.client_cpus else None)
    runner = Runner(config, client)
    ceilings = Ceilings(config, runner)
    try:
        with tempfile.TemporaryDirectory(prefix="agentvault-getagent-") as tmp, infrastructure(Path(tmp)) as infra:
            postgres, redis_url = infra
            asyncio.run(_create_database(postgres.uri(), "bench"))
            dsn = postgres.uri("bench")
            metrics_port = free_port()
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            env = registry_env(dsn, redis_url, Path(tmp) / "data", metrics_port)
            if args.cache_ttl:
                env["REGISTRY_AGENT_CACHE_TTL"] = args.cache_ttl
            mesh = Mesh(env, log_dir=Path(tmp) / "logs", services=SERVICES)
            try:
                with pinned(set(config.server_cpus or ())):
                    mesh.start_service("registry", timeout=60)
                print(f"seeding {args.size:,} agents ...", flush=True)
                population = dataset.Population.build()
                info = asyncio.run(seed_to(dsn, population, 0, args.size))
                workloads = build_workloads(population, info["visible_ids"], random.Random(dataset.SEED))
                asyncio.run(read_once(mesh.address("registry"), workloads.get, config.concurrency))
                address = mesh.address("registry")
                pid = mesh.processes["registry"].pid
                echo_total = get_total = 0.0
                for index in range(args.rounds):
                    echo_figure = ceilings.echo("ceiling")
                    echo_cpu = cpu_us(echo_figure)
                    spy = None
                    if args.py_spy and index == args.rounds - 1:
                        spy = subprocess.Popen(
                            [shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy", "record",
                             "-o", str(args.py_spy), "--pid", str(pid), "--duration", str(int(config.duration)),
                             "--rate", "250", "--nonblocking", *(["--native"] if args.native else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                    job = runner.grpc_job(address, GET_METHOD, workloads.get, config.concurrency)
                    before = cache_lookups(metrics_url)
                    get = runner.measure("registry", f"GetAgent c={config.concurrency}", job, {"server": [pid]})
                    if spy is not None:
                        spy.wait(60)
                    if args.health:
                        # The registry process's own floor: the stock health servicer (no instrumentation, no
                        # cache) on the same server.
                        check = HealthCheckRequest(service="").SerializeToString()
                        health_job = runner.grpc_job(address, HEALTH_METHOD, (check,), config.concurrency)
                        health = runner.measure("registry", "health Check", health_job, {"server": [pid]})
                        print(
                            f"  round {index + 1}: server CPU per call: registry health Check {cpu_us(health):.0f} us"
                        )
                    echo_total += echo_figure.throughput or 0.0
                    get_total += get.throughput or 0.0
                    share = (get.throughput or 0.0) / max(echo_figure.throughput or 1.0, 1.0)
                    after = cache_lookups(metrics_url)
                    hits, misses = after["hit"] - before["hit"], after["miss"] - before["miss"]
                    print(f"  round {index + 1}: server CPU per call: echo {echo_cpu:.0f} us, GetAgent "
                          f"{cpu_us(get):.0f} us", flush=True)  # fmt: skip
                    print(f"  round {index + 1}: GetAgent {share:.1%} of echo; cache {hits:,.0f} hits, "
                          f"{misses:,.0f} misses ({misses / max(hits + misses, 1):.1%})", flush=True)  # fmt: skip
                share = get_total / max(echo_total, 1.0)
                verdict = "PASS" if share >= GET_AGENT_VS_ECHO else "MISS"
                print(f"\nGetAgent at {args.size:,} agents: {share:.1%} of echo over {args.rounds} interleaved rounds "
                      f"(goal >= {GET_AGENT_VS_ECHO:.0%}: {verdict})")  # fmt: skip
            finally:
                mesh.stop()
    finally:
        ceilings.close()
        client.close()
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    with sigterm_as_interrupt():
        sys.exit(run(*parse()))


if __name__ == "__main__":
    main()
