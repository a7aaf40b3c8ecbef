"""`python -m bench.federation_bench`: federated search over 10 peer meshes on loopback, measured at the service.

Real processes on embedded PostgreSQL and Redis: an aggregator mesh A (registry + discovery), a baseline
aggregator A1 (registry + discovery) peered with one mesh only, and 10 peer meshes (registry only, each with its
own database and Redis db number) holding federated agents that match the query. The peers issue federation
credentials to A and A1, which add them as gRPC peers. The bench calls DiscoveryService.SearchAgents on A's (or
A1's) discovery directly over gRPC, one call at a time, and reads discovery's grpc_server_handling_seconds.

Scenarios: (a) 10 peers with force_refresh, in blocks alternating with (d) A1's single peer, so both see the same
machine: "memo", one fixed query, so the peers and the aggregator answer from their in-memory memos (the Redis
cache is skipped, nothing else); (a cold) and (d cold): the same with a query never asked before on every call
(two words of a vocabulary every federated agent carries a random half of, so each query matches a different
quarter of the agents: the peers search, and the aggregator parses, validates, scores and caches, every time);
(b) 10 peers served from the cache; (c) 10 peers plus a silent peer (a TCP server of ours that accepts
connections and never sends a byte): registered as a REST peer, uncached and cached, then (that one
deactivated) as a gRPC peer, uncached; (e), (f), (e cold) and (f cold) repeat (a), (d) and their cold runs with
every peer behind a proxy of ours that delays each byte by half a round trip each way (a network between meshes,
which loopback lacks). The figures go to .build/bench/federation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from agentvault.devserver.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from bench.federation_measure import Client, CpuAccount
from bench.federation_meshes import (
    QUERY,
    ColdQueries,
    Node,
    Peering,
    SilentPeers,
    add_peer,
    create_databases,
    issue_credential,
    mesh_env,
    seed,
    vocabulary,
)
from bench.federation_net import DelayProxies, SilentPeer
from bench.federation_report import CACHED_P50_MS, COLD_WAN_VS_SINGLE, UNCACHED_VS_SINGLE, judge, table
from bench.federation_scenarios import Plan, run_scenarios
from bench.procs import (
    machine,
    postmaster_pid,
    sigterm_as_interrupt,
)
from bench.report import clean_nan

REPO = Path(__file__).resolve().parent.parent


def close_all(clients: list[Client], nodes: list[Node]) -> None:
    for client in clients:
        client.close()
    for node in nodes:
        node.mesh.stop()


def run(plan: Plan, output: Path | None, profile: Path | None = None) -> int:
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, "
          f"Python {info['python']} ({info['implementation']}), kernel {info['kernel']}")  # fmt: skip
    load = info["load_average_at_start"]
    busy = "  << the machine is busy: figures will be disturbed" if load[0] > 0.5 else ""
    print(f"load average at start: {load[0]} (1 min), {load[1]} (5 min){busy}")
    print(f"plan: {asdict(plan)}", flush=True)
    started = time.monotonic()
    nodes: list[Node] = []
    clients: list[Client] = []
    silent_rest, silent_grpc = SilentPeer(), SilentPeer()
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentvault-fedbench-")))
        postgres = EmbeddedPostgres(root / "pg", delete_on_stop=True)
        redis = EmbeddedRedis(root / "redis")
        stack.callback(postgres.stop)
        stack.callback(redis.stop)
        stack.callback(silent_rest.stop)
        stack.callback(silent_grpc.stop)
        # Registered after the infrastructure, so they run before it stops.
        stack.callback(close_all, clients, nodes)
        postgres.start()
        redis_url = redis.start().rsplit("/", 1)[0]
        names = ["fed_a", "fed_a1", *(f"fed_peer_{i}" for i in range(plan.peers))]
        asyncio.run(create_databases(postgres.uri(), names))

        aggregator_extra = {
            "FEDERATION_QUERY_TIMEOUT": str(plan.timeout_ms),
            "FEDERATION_CACHE_TTL": "300",
        }
        pair = tuple(s for s in SERVICES if s.name in ("registry", "discovery"))
        registry_only = tuple(s for s in SERVICES if s.name == "registry")
        for number, name in enumerate(names, start=1):
            aggregator = name in ("fed_a", "fed_a1")
            extra = {**aggregator_extra, "DISCOVERY_METRICS_PORT": str(free_port())} if aggregator else {
                # Ten registries share one PostgreSQL; the bench calls each peer hundreds of times a minute.
                "REGISTRY_DB_POOL_SIZE": "3",
                "FEDERATION_RATE_LIMIT_PER_MINUTE": "1000000",
            }  # fmt: skip
            if profile is not None and name == "fed_a":
                # A's processes under cProfile (bench/cprofile_site/sitecustomize.py), dumped when they stop.
                profile.mkdir(parents=True, exist_ok=True)
                extra |= {"PYTHONPATH": str(REPO / "bench" / "cprofile_site"), "BENCH_CPROFILE_DIR": str(profile)}
            env = mesh_env(name, postgres.uri(name), f"{redis_url}/{number}", root / name, **extra)
            mesh = Mesh(env, log_dir=root / name / "logs", services=pair if aggregator else registry_only)
            metrics = f"http://127.0.0.1:{env['DISCOVERY_METRICS_PORT']}/metrics" if aggregator else ""
            nodes.append(Node(name, mesh, env["AGENTVAULT_ADMIN_TOKEN"], metrics))
        a, a1, peers = nodes[0], nodes[1], nodes[2:]

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda node: node.mesh.start(timeout=120), nodes))
        print(f"{len(nodes)} meshes started in {time.monotonic() - t0:.1f} s", flush=True)

        t0 = time.monotonic()
        # (a), (d), (e) and (f) cold, warm-up included: every query distinct.
        words = vocabulary(4 * (plan.calls + plan.warmup))
        with concurrent.futures.ThreadPoolExecutor(plan.peers) as pool:
            list(pool.map(lambda i: seed(peers[i], i, plan.agents_per_peer, words), range(plan.peers)))
        peering = Peering(a, a1, [p.mesh.address("registry") for p in peers], [], "")
        for i, peer in enumerate(peers):
            endpoint = peering.endpoints[i]
            peering.tokens_a.append(issue_credential(peer, "fed_a"))
            peering.ids_a.append(add_peer(a, f"peer-{i}", endpoint, peering.tokens_a[i]))
            if i == 0:
                peering.token_a1 = issue_credential(peer, "fed_a1")
                peering.id_a1 = add_peer(a1, "peer-0", endpoint, peering.token_a1)
        print(f"{plan.peers} peers seeded with {plan.agents_per_peer} federated agents each and peered with A, "
              f"peer-0 also with A1, in {time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip

        many, single = Client(a, "dis"), Client(a1, "dis1")
        if profile is not None:
            print(f"profiling A: discovery is pid {a.pid('discovery')}, its registry {a.pid('registry')}", flush=True)
        clients += [many, single]
        many.wait_for_peers({f"peer-{i}" for i in range(plan.peers)})
        single.wait_for_peers({"peer-0"})

        account = CpuAccount(
            {
                "cli": [os.getpid()],
                "dis": [a.pid("discovery")],
                "dis1": [a1.pid("discovery")],
                "reg": [a.pid("registry"), a1.pid("registry")],
                "peers": [p.pid("registry") for p in peers],
            },
            postmaster_pid(root / "pg"),
        )
        silent = SilentPeers(a, silent_rest.start(), silent_grpc.start())
        proxies = DelayProxies(plan.wan_rtt_ms / 2000)
        stack.callback(proxies.stop)
        proxies.start()
        figures = run_scenarios(plan, many, single, account, silent, peering, proxies, ColdQueries(words))
        judged = judge(figures, plan)
        report = {
            "benchmark": "federated search",
            "plan": asdict(plan),
            "query": QUERY,
            "cold_vocabulary_words": len(words),
            "goals": {
                "memo_vs_single": UNCACHED_VS_SINGLE,
                "cold_vs_single_with_network": COLD_WAN_VS_SINGLE,
                "cached_p50_ms": CACHED_P50_MS,
            },
            **judged,
            "silent_peer_connections": {"rest": silent_rest.connections, "grpc": silent_grpc.connections},
            "machine": info,
            "figures": [asdict(f) for f in figures],
        }
    report["wall_s"] = round(time.monotonic() - started, 1)
    print("\n" + table(figures))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(clean_nan(report), indent=2, allow_nan=False) + "\n")
        print(f"\nfigures written to {output} ({report['wall_s']} s)")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.federation_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls and agents (about a minute)")
    parser.add_argument("--peers", type=int, help="peer meshes (default 10)")
    parser.add_argument("--calls", type=int, help="calls per scenario (default 200, quick 50)")
    parser.add_argument("--silent-calls", type=int, help="uncached calls with the silent peer (default 100, quick 15)")
    parser.add_argument("--timeout-ms", type=int, help="A's FEDERATION_QUERY_TIMEOUT in ms (default 1000)")
    parser.add_argument("--wan-rtt-ms", type=float, help="round trip the proxies of (e) and (f) add (default 20)")
    parser.add_argument("--output", type=Path, default=REPO / ".build" / "bench" / "federation.json")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="run A's processes under cProfile; <pid>.prof files go to DIR"
    )
    args = parser.parse_args(argv)
    plan = (
        Plan(agents_per_peer=20, calls=50, silent_calls=15, silent_cached_calls=5, silent_grpc_calls=10, warmup=5)
        if args.quick
        else Plan()
    )
    overrides = {
        "peers": args.peers,
        "calls": args.calls,
        "silent_calls": args.silent_calls,
        "timeout_ms": args.timeout_ms,
        "wan_rtt_ms": args.wan_rtt_ms,
    }
    plan = Plan(**{**asdict(plan), **{k: v for k, v in overrides.items() if v is not None}})
    sys.exit(run(plan, args.output, args.profile))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
