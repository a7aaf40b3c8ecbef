"""The federation bench's measuring: sequential calls on an aggregator, CPU accounts, and each scenario's figure."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from agentvault.discovery.v1 import discovery_service_pb2 as dpb
from agentvault.discovery.v1 import discovery_service_pb2_grpc as dpb_grpc
from bench import promhist
from bench.federation_meshes import QUERY, ColdQueries, Node
from bench.procs import (
    children,
    cpu_seconds,
    machine_busy_seconds,
)

HISTOGRAM = "grpc_server_handling_seconds"
SEARCH_LABELS = {"grpc_service": "agentvault.discovery.v1.DiscoveryService", "grpc_method": "SearchAgents"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN without values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class CpuAccount:
    """CPU seconds used by groups of processes, sampled between blocks of calls (never inside a timed call)."""

    def __init__(self, groups: dict[str, list[int]], postmaster: int | None) -> None:
        self.groups = groups
        self.postmaster = postmaster

    def sample(self) -> dict[str, float]:
        found = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}
        if self.postmaster is not None:
            found["db"] = sum(cpu_seconds(p) for p in (self.postmaster, *children(self.postmaster)))
        found["machine"] = machine_busy_seconds()
        return found


@dataclass(frozen=True)
class Expect:
    """What every answer of a scenario must show, or it counts as an error."""

    peers: int
    ok: int
    cached: int
    failed: int = 0


@dataclass
class Series:
    """One scenario's calls: latencies at the client, the fan-out (slowest peer), the silent peer's fate, CPU."""

    calls: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    fanout_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    silent_status: dict[str, int] = field(default_factory=dict)
    silent_ms: list[float] = field(default_factory=list)
    silent_errors: dict[str, int] = field(default_factory=dict)
    results: list[int] = field(default_factory=list)
    # Peers' answers used (not from the cache), for the aggregator's CPU per peer answer.
    peer_answers: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    server: promhist.Buckets = field(default_factory=dict)
    server_missing: bool = False
    # The CpuAccount group of the discovery process that served the calls.
    cpu_group: str = ""


class Client:
    """Sequential SearchAgents calls on one aggregator's discovery (concurrency 1); `cpu_group` names its
    discovery process in the CpuAccount."""

    def __init__(self, node: Node, cpu_group: str) -> None:
        self.node = node
        self.cpu_group = cpu_group
        self.channel = grpc.insecure_channel(node.mesh.address("discovery"))
        self.stub = dpb_grpc.DiscoveryServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def search(self, force_refresh: bool, query: str = QUERY) -> tuple[float, dpb.SearchAgentsResponse]:
        request = dpb.SearchAgentsRequest(include_federated=True, search=query, force_refresh=force_refresh)
        start = time.perf_counter()
        reply: dpb.SearchAgentsResponse = self.stub.SearchAgents(request, metadata=self.node.auth, timeout=30)
        return (time.perf_counter() - start) * 1000, reply

    def call(
        self,
        series: Series,
        force_refresh: bool,
        expect: Expect,
        silent_name: str = "",
        cold: ColdQueries | None = None,
    ) -> None:
        series.calls += 1
        try:
            elapsed, reply = self.search(force_refresh, cold.next() if cold is not None else QUERY)
        except grpc.RpcError as exc:
            series.errors += 1
            if len(series.error_samples) < 3:
                series.error_samples.append(f"{exc.code().name}: {exc.details()}")
            return
        stats = reply.federation_stats
        seen = Expect(len(stats.peers), stats.successful_queries, stats.cached_queries, stats.failed_queries)
        if seen != expect:
            series.errors += 1
            if len(series.error_samples) < 3:
                problems = [f"{p.name}: {dpb.PeerQueryStatus.Name(p.status)} {p.error}" for p in stats.peers if p.error]
                series.error_samples.append(f"expected {expect}, got {seen}; {'; '.join(problems)[:400]}")
        # Answers with a peer missing still count: their latency is what the caller waited.
        series.latencies_ms.append(elapsed)
        series.results.append(len(reply.agents))
        series.peer_answers += stats.successful_queries - stats.cached_queries
        series.fanout_ms.append(max((p.latency_ms for p in stats.peers if p.name != silent_name), default=0.0))
        for p in stats.peers:
            if p.name == silent_name:
                status = dpb.PeerQueryStatus.Name(p.status).removeprefix("PEER_QUERY_STATUS_").lower()
                series.silent_status[status] = series.silent_status.get(status, 0) + 1
                series.silent_ms.append(p.latency_ms)
                if p.error:
                    text = p.error[:90]
                    series.silent_errors[text] = series.silent_errors.get(text, 0) + 1

    def block(
        self,
        series: Series,
        calls: int,
        force_refresh: bool,
        expect: Expect,
        account: CpuAccount,
        silent_name: str = "",
        cold: ColdQueries | None = None,
    ) -> None:
        """`calls` sequential calls, with CPU and discovery's histogram taken around the block."""
        hist_before, cpu_before = self.scrape(), account.sample()
        start = time.perf_counter()
        for _ in range(calls):
            self.call(series, force_refresh, expect, silent_name, cold)
        series.wall_s += time.perf_counter() - start
        cpu_after, hist_after = account.sample(), self.scrape()
        for name, value in cpu_after.items():
            series.cpu_s[name] = series.cpu_s.get(name, 0.0) + max(0.0, value - cpu_before.get(name, 0.0))
        if hist_before is None or hist_after is None:
            series.server_missing = True
            return
        for bound, count in promhist.difference(hist_after, hist_before).items():
            series.server[bound] = series.server.get(bound, 0.0) + count
        series.cpu_group = self.cpu_group

    def scrape(self) -> promhist.Buckets | None:
        try:
            return promhist.scrape(self.node.metrics_url, HISTOGRAM, SEARCH_LABELS)
        except OSError:
            return None

    def warm(
        self, calls: int, force_refresh: bool, expect: Expect, silent_name: str = "", cold: ColdQueries | None = None
    ) -> None:
        ignored = Series()
        for _ in range(calls):
            self.call(ignored, force_refresh, expect, silent_name, cold)

    def wait_for_peers(self, names: set[str], timeout: float = 30) -> None:
        """Discovery reloads its peer list every DISCOVERY_PEER_LIST_TTL (1.5 s): waits until it asks `names`."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            _, reply = self.search(force_refresh=False)
            seen = {p.name for p in reply.federation_stats.peers}
            if seen == names:
                return
            time.sleep(0.25)
        raise TimeoutError(f"{self.node.name}'s discovery asks {sorted(seen)}, not {sorted(names)}, after {timeout}s")


@dataclass
class Figure:
    key: str
    name: str
    calls: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    server_p50_ms: float = math.nan
    server_p99_ms: float = math.nan
    server_count: int = 0
    fanout_p50_ms: float = math.nan
    errors: int = 0
    cpu_ms_per_call: dict[str, float] = field(default_factory=dict)
    aggregator_cpu_us_per_peer_answer: float = math.nan
    other_load_percent: float = math.nan
    goal: str = ""
    verdict: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def figure(key: str, name: str, series: Series) -> Figure:
    f = Figure(key, name, calls=series.calls, errors=series.errors)
    f.p50_ms = percentile(series.latencies_ms, 0.50)
    f.p99_ms = percentile(series.latencies_ms, 0.99)
    f.max_ms = max(series.latencies_ms, default=math.nan)
    f.fanout_p50_ms = percentile(series.fanout_ms, 0.50)
    if series.server and not series.server_missing:
        f.server_p50_ms = promhist.quantile(series.server, 0.50) * 1000
        f.server_p99_ms = promhist.quantile(series.server, 0.99) * 1000
        f.server_count = promhist.count(series.server)
        f.extra["server_p50_at_most_ms"] = promhist.upper_bound(series.server, 0.50) * 1000
    if series.calls:
        ours = {k: v for k, v in series.cpu_s.items() if k != "machine"}
        f.cpu_ms_per_call = {k: round(1000 * v / series.calls, 1) for k, v in ours.items()}
        other = max(0.0, series.cpu_s.get("machine", 0.0) - sum(ours.values()))
        f.other_load_percent = round(100 * other / max(series.wall_s, 1e-9), 1)
    if series.peer_answers and series.cpu_group:
        # Everything the aggregator's discovery process did in the block (the local search included), per answer.
        f.aggregator_cpu_us_per_peer_answer = round(1e6 * series.cpu_s.get(series.cpu_group, 0.0) / series.peer_answers)
    f.extra["results_per_page"] = sorted(set(series.results))
    if series.error_samples:
        f.extra["error_samples"] = series.error_samples
    if series.silent_status:
        f.extra["silent_peer_status"] = series.silent_status
        f.extra["silent_peer_p50_ms"] = round(percentile(series.silent_ms, 0.5), 1)
        f.extra["silent_peer_max_ms"] = round(max(series.silent_ms), 1)
        f.extra["silent_peer_errors"] = series.silent_errors
    return f
