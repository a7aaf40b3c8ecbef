"""The federation bench's plan and scenarios: memo, cold, cached, silent peer, and behind a network."""

from __future__ import annotations

from dataclasses import dataclass

from bench.federation_measure import Client, CpuAccount, Expect, Figure, Series, figure
from bench.federation_meshes import ColdQueries, Peering, SilentPeers
from bench.federation_net import DelayProxies


@dataclass(frozen=True)
class Plan:
    peers: int = 10
    agents_per_peer: int = 50
    calls: int = 200  # per scenario (a), (b), (d)
    silent_calls: int = 100  # (c) uncached: each costs about one deadline
    silent_cached_calls: int = 20  # (c) cached
    silent_grpc_calls: int = 40  # (c) with the silent server as a gRPC peer, uncached
    wan_rtt_ms: float = 20.0  # (e) and (f): the round trip the delay proxies add between meshes
    warmup: int = 10  # calls before each scenario, not measured
    timeout_ms: int = 1000  # A's FEDERATION_QUERY_TIMEOUT
    margin_ms: float = 100.0  # what (c)'s p99 may exceed the deadline by


def run_scenarios(
    plan: Plan,
    many: Client,
    single: Client,
    account: CpuAccount,
    silent: SilentPeers,
    peering: Peering,
    proxies: DelayProxies,
    cold: ColdQueries,
) -> list[Figure]:
    n = plan.peers
    peer_names = {f"peer-{i}" for i in range(n)}
    all_ok, one_ok = Expect(n, n, 0), Expect(1, 1, 0)

    def alternate(queries: ColdQueries | None = None) -> tuple[Series, Series]:
        """Uncached calls on A and A1 in alternating blocks, so that both see the same machine; blocks rather
        than single calls, so that A's background writes after a search (query log, cache rows) do not land
        inside A1's calls. Memo (`queries` None): the fixed query with force_refresh; cold: a new query per call,
        which no cache holds, so force_refresh is not needed (the cache read is part of a cold search)."""
        refresh = queries is None
        many.warm(plan.warmup, refresh, all_ok, cold=queries)
        single.warm(plan.warmup, refresh, one_ok, cold=queries)
        on_many, on_single = Series(), Series()
        for number in range(blocks):
            size = plan.calls // blocks + (1 if number < plan.calls % blocks else 0)
            many.block(on_many, size, refresh, all_ok, account, cold=queries)
            single.block(on_single, size, refresh, one_ok, account, cold=queries)
        return on_many, on_single

    blocks = max(1, min(4, plan.calls // 25))
    print(f"(a)+(d) memo, {plan.calls} calls each, in {blocks} alternating blocks", flush=True)
    series_a, series_d = alternate()
    print(f"(a)+(d) cold, {plan.calls} calls each, in {blocks} alternating blocks", flush=True)
    series_ac, series_dc = alternate(cold)

    # (b) every peer's answer from the Redis cache (the uncached calls above filled it).
    print(f"(b) cached, {plan.calls} calls", flush=True)
    many.warm(plan.warmup, False, Expect(n, n, n))
    series_b = Series()
    many.block(series_b, plan.calls, False, Expect(n, n, n), account)

    # (c) one more peer that accepts connections and never answers: as a REST peer (every call waits for the
    # deadline), then as a gRPC peer (gRPC's own connection handshake gives up on it).
    name = silent.add_rest()
    many.wait_for_peers(peer_names | {name})
    print(f"(c) silent REST peer: {plan.silent_calls} uncached calls, {plan.silent_cached_calls} cached", flush=True)
    series_c, series_c2 = Series(), Series()
    many.block(series_c, plan.silent_calls, True, Expect(n + 1, n, 0, failed=1), account, name)
    many.block(series_c2, plan.silent_cached_calls, False, Expect(n + 1, n, n, failed=1), account, name)

    name = silent.swap_to_grpc()
    many.wait_for_peers(peer_names | {name})
    print(f"(c) silent gRPC peer: {plan.silent_grpc_calls} uncached calls", flush=True)
    series_cg = Series()
    many.block(series_cg, plan.silent_grpc_calls, True, Expect(n + 1, n, 0, failed=1), account, name)

    # (e) and (f): (a) and (d) again with a network between the meshes.
    names = peering.behind_proxies(proxies, silent)
    many.wait_for_peers(names)
    single.wait_for_peers({"wan-peer-0"})
    print(f"(e)+(f) memo behind {plan.wan_rtt_ms:g} ms round trips, {plan.calls} calls each", flush=True)
    series_e, series_f = alternate()
    print(f"(e)+(f) cold behind {plan.wan_rtt_ms:g} ms round trips, {plan.calls} calls each", flush=True)
    series_ec, series_fc = alternate(cold)

    rtt = f"{plan.wan_rtt_ms:g} ms RTT"
    return [
        figure("a", f"(a) memo, {n} peers", series_a),
        figure("ac", f"(a) cold, {n} peers", series_ac),
        figure("b", f"(b) cached, {n} peers", series_b),
        figure("c", f"(c) memo, {n} + silent REST peer", series_c),
        figure("c2", f"(c) cached, {n} + silent REST peer", series_c2),
        figure("cg", f"(c) memo, {n} + silent gRPC peer", series_cg),
        figure("d", "(d) memo, 1 peer (baseline)", series_d),
        figure("dc", "(d) cold, 1 peer (baseline)", series_dc),
        figure("e", f"(e) memo, {n} peers, {rtt}", series_e),
        figure("ec", f"(e) cold, {n} peers, {rtt}", series_ec),
        figure("f", f"(f) memo, 1 peer, {rtt}", series_f),
        figure("fc", f"(f) cold, 1 peer, {rtt}", series_fc),
    ]
