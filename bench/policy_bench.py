"""`python -m bench.policy_bench [--quick]`: one policy decision in-process with 1,000 Cedar policies, and Explain.

The engine (agentvault.common.policy) holds 1,000 policies: 800 naming one caller, 150 naming one tool and 50
general rules (trust, payload, rate, concurrency, quota, office hours, ask), plus 100 grants. Requests rotate over
1,000 active (caller, tool) pairs of 220 callers and 60 tools. Each figure is the distribution of single calls
timed with perf_counter_ns, one call at a time, after a warm-up, in this process, in rounds interleaved with the
ceilings measured in the same run:

* bare cedarpy, 1 policy: `cedarpy.is_authorized` with one pre-parsed policy and pre-parsed entities, i.e. the
  least one Cedar decision through cedarpy costs here;
* bare cedarpy, 1,000 policies: the same call given the whole set, which is what the engine's slicing avoids;
* bare cedarpy, one request's slice: the same call given only the candidates the engine picks for it, in one
  set, the one Cedar call `engine.decide` makes, so the difference is the engine's own cost in Python.

Also: the cost of a first decision for a new caller/tool pair (its own candidates and entities are parsed then),
measured on a second engine with the same policies and grants so that the new pairs do not push the 1,000 active
ones out of the first engine's cache; the memory an active pair costs (the growth of this process's resident
memory while the 1,000 pairs are first decided, per pair, and what the engine charges its caches per pair); and
the cost of a full `replace` of 1,000 new policies, and of a `replace` that changes one policy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cedarpy

from agentvault.common.policy import (
    Grant,
    Outcome,
    PolicyEngine,
    Trust,
    caller,
    external_client,
    tool_target,
)
from agentvault.common.principal import Kind, Principal
from bench.procs import machine

GOAL_P99_US = 200.0
REPO = Path(__file__).resolve().parent.parent
SEED = 11
ROUNDS = 10
CEILING = "ceiling: bare cedarpy, 1 policy"
DECIDE = "engine.decide, 1,000 policies + 100 grants"
FIRST = "engine.decide, first call of a new pair"
CALLERS = 200
TOOLS = 60
ACTIVE_PAIRS = 1_000


def policies() -> dict[str, str]:
    rng = random.Random(SEED)
    out: dict[str, str] = {}
    for i in range(800):
        action = rng.choice(["tool.invoke", "tool.list", "message.send", "agent.read"])
        out[f"caller-{i}"] = (
            f'permit(principal == Caller::Agent::"agent-{i % 400}", action == Action::"{action}", resource) '
            f"when {{ context.payload_size < {rng.randint(1_000, 1_000_000)} && principal.trust_rank >= 2 }};"
        )
    for i in range(150):
        out[f"tool-{i}"] = (
            f'permit(principal is Caller::Agent, action == Action::"tool.invoke", '
            f'resource == Target::Tool::"agent-{i % TOOLS}/tool") '
            f'when {{ principal.scopes.contains("tools:invoke") && context.calls_in_window < {rng.randint(10, 100)} }};'
        )
    # 50 distinct general rules: half for any action (so in every slice), half for one action each.
    constraints = ["payload_size", "calls_in_window", "concurrent_calls", "calls_today"]
    actions = ["tool.invoke", "tool.list", "message.send", "agent.read", "session.handoff", "capability.request"]
    for i in range(50):
        scope = "action" if i % 2 == 0 else f'action == Action::"{actions[i % len(actions)]}"'
        field = constraints[i % len(constraints)]
        if i % 5 == 0:
            rule = (
                f'@decision("ask") permit(principal is Caller::Client, {scope}, resource) '
                f"when {{ context.{field} < {i + 1_000} }};"
            )
        elif i % 5 == 1:
            rule = (
                f"permit(principal, {scope}, resource) when {{ principal.trust_rank >= 3 && context.hour >= {i % 9} "
                f"&& context.hour < 20 && context.weekday < 5 }};"
            )
        else:
            rule = (
                f'forbid(principal, {scope}, resource) when {{ principal.trust == "blocked" || '
                f"context.{field} > {10_000 + i * 1000} }};"
            )
        out[f"general-{i}"] = rule
    return out


def timed(call: Callable[[], Any], calls: int) -> list[tuple[float, float]]:
    """(wall, this thread's CPU) microseconds per call: on a busy machine the CPU time is what a quiet one shows."""
    samples = []
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    for _ in range(calls):
        start, start_cpu = wall(), cpu()
        call()
        samples.append(((wall() - start) / 1000, (cpu() - start_cpu) / 1000))
    return samples


def _pct(ordered: list[float], q: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall = sorted(w for w, _ in samples)
    cpu = sorted(c for _, c in samples)
    return {
        "calls": len(wall),
        "p50_us": _pct(wall, 0.5),
        "p99_us": _pct(wall, 0.99),
        "max_us": round(wall[-1], 1),
        "cpu_p50_us": _pct(cpu, 0.5),
        "cpu_p99_us": _pct(cpu, 0.99),
    }


def rss_bytes() -> int:
    """This process's resident memory, from /proc (0 where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def charged_bytes(engine: PolicyEngine) -> int:
    """What the engine's caches count against their budgets (candidate sets twice: by content and by request)."""
    return engine._handles.bytes + engine._state.slices.bytes + engine._entities.bytes


def with_grants(engine: PolicyEngine) -> PolicyEngine:
    for i in range(100):
        grant_caller = caller(Principal(Kind.AGENT, f"agent-{i}"), Trust.BASIC, "mesh-a")
        engine.grant(Grant.of(f"g{i}", grant_caller, "tool.invoke", tool_target(f"agent-{i % TOOLS}", "tool"), 2e9))
    return engine


def run(quick: bool, output: Path) -> int:
    calls, warmup = (3_000, 1_000) if quick else (30_000, 5_000)
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores; load average {info['load_average_at_start'][0]}")
    texts = policies()
    start = time.perf_counter()
    engine = PolicyEngine(texts, clock=lambda: 1_795_000_000.0)  # a Thursday, 13:33 UTC
    replace_all_ms = (time.perf_counter() - start) * 1000
    with_grants(engine)
    changed = dict(texts, **{"caller-0": texts["caller-0"].replace("< ", "<= ", 1)})
    start = time.perf_counter()
    engine.replace(changed)
    replace_one_ms = (time.perf_counter() - start) * 1000

    rng = random.Random(SEED)
    scopes = frozenset({"tools:invoke"})
    agents = [
        caller(Principal(Kind.AGENT, f"agent-{i}", scopes=scopes), rng.choice(list(Trust)[1:]), "mesh-a")
        for i in range(CALLERS)
    ]
    callers = [*agents, *(external_client(f"https://x{i}.example") for i in range(20))]
    tools = [tool_target(f"agent-{i}", "tool", version="1.0.0") for i in range(TOOLS)]
    # The active (caller, tool) pairs: each pair's own candidates are parsed once and kept (within the engine's
    # cache budget); a pair seen for the first time is the "first call" figure.
    pairs = list(dict.fromkeys((rng.choice(callers), rng.choice(tools)) for _ in range(ACTIVE_PAIRS * 2)))
    pairs = pairs[:ACTIVE_PAIRS]
    requests = [
        (*rng.choice(pairs), {"payload_size": rng.randint(0, 20_000), "calls_in_window": 5}) for _ in range(4096)
    ]
    rss_before, charged_before = rss_bytes(), charged_bytes(engine)
    sizes = sorted(len(engine._slice(engine._state, "tool.invoke", who, what.uid).ids) for who, what, _ in requests)
    slice_sizes = f"{sizes[0]}/{sizes[len(sizes) // 2]}/{sizes[-1]}"
    outcomes = {o: 0 for o in Outcome}
    for who, what, ctx in requests:
        outcomes[engine.decide(who, "tool.invoke", what, ctx).outcome] += 1
    used = len({(who, what) for who, what, _ in requests})
    rss_per_pair = (rss_bytes() - rss_before) / used
    charged_per_pair = (charged_bytes(engine) - charged_before) / used
    position = iter(range(10**12))

    def decide() -> None:
        who, what, ctx = requests[next(position) % len(requests)]
        engine.decide(who, "tool.invoke", what, ctx)

    def explain() -> None:
        who, what, ctx = requests[next(position) % len(requests)]
        engine.explain(who, "tool.invoke", what, ctx)

    fresh = iter(range(10**12))
    newcomer = with_grants(PolicyEngine(changed, clock=engine.clock))

    seen = {(who.id, what.id) for who, what in pairs}
    unseen = [
        (caller(Principal(Kind.AGENT, f"agent-{i}", scopes=scopes), Trust.TRUSTED, "mesh-a"), tool)
        for i in range(400)
        for tool in tools
        if (f"agent-{i}", tool.id) not in seen
    ]
    rng.shuffle(unseen)

    def first_decision() -> None:
        # A pair never seen: its entities and its own candidates (the caller's and the tool's) are parsed now.
        who, what = unseen[next(fresh) % len(unseen)]
        newcomer.decide(who, "tool.invoke", what, {"payload_size": 10})

    one = cedarpy.PolicySet.from_str(texts["general-6"])
    whole = cedarpy.PolicySet.from_str("\n".join(texts.values()))
    who, what, ctx = requests[0]
    piece = engine._slice(engine._state, "tool.invoke", who, what.uid).ids
    piece_handle = cedarpy.PolicySet.from_str("\n".join(engine._state.meta(pid).text for pid in piece))
    entities = cedarpy.Entities.from_json_str(json.dumps([who.entity(), what.entity()]))
    request = {
        "principal": {"type": who.type, "id": who.id},
        "action": {"type": "Action", "id": "tool.invoke"},
        "resource": {"type": what.type, "id": what.id},
        "context": {"now": 1_795_000_000, "hour": 13, "weekday": 3, "calls_today": 0, "concurrent_calls": 0, **ctx},
    }
    # Interleaved rounds, so that a burst of load from elsewhere on the machine hits every figure alike.
    plan: dict[str, tuple[Callable[[], Any], int]] = {
        CEILING: (lambda: cedarpy.is_authorized(request, one, entities), calls),
        "bare cedarpy, 1,000 policies": (lambda: cedarpy.is_authorized(request, whole, entities), calls // 20),
        f"bare cedarpy, one request's slice ({len(piece)})": (
            lambda: cedarpy.is_authorized(request, piece_handle, entities),
            calls,
        ),
        DECIDE: (decide, calls),
        FIRST: (first_decision, calls // 10),
        "engine.explain, 1,000 policies": (explain, calls // 5),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in plan}
    for name, (call, _) in plan.items():
        if name != FIRST:
            timed(call, warmup // 10 if name.startswith("bare cedarpy, 1,000") else warmup)
    for _ in range(ROUNDS):
        for name, (call, total) in plan.items():
            samples[name] += timed(call, max(1, total // ROUNDS))
    figures = {name: summary(values) for name, values in samples.items()}
    decide_p99 = figures[DECIDE]["p99_us"]
    verdict = "PASS" if decide_p99 < GOAL_P99_US else "MISS"
    cpu_verdict = "PASS" if figures[DECIDE]["cpu_p99_us"] < GOAL_P99_US else "MISS"
    print(f"\n{'figure':<46} {'p50 us':>8} {'p99 us':>8} {'max us':>8} {'CPU p50':>8} {'CPU p99':>8} {'calls':>6}")
    for name, f in figures.items():
        print(f"{name:<46} {f['p50_us']:>8.1f} {f['p99_us']:>8.1f} {f['max_us']:>8.1f} {f['cpu_p50_us']:>8.1f} "
              f"{f['cpu_p99_us']:>8.1f} {f['calls']:>6}")  # fmt: skip
    ceiling = figures[CEILING]
    print(
        f"\ndecide p99 {decide_p99:.1f} us vs goal {GOAL_P99_US:.0f} us: {verdict}; decide / ceiling: "
        f"p50 {figures[DECIDE]['p50_us'] / ceiling['p50_us']:.1f}x, p99 {decide_p99 / ceiling['p99_us']:.1f}x"
    )
    print(f"decide CPU p99 {figures[DECIDE]['cpu_p99_us']:.1f} us vs goal: {cpu_verdict} (the time this thread ran; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")  # fmt: skip
    print(f"candidate slice: {slice_sizes} policies of {len(texts) + 100} per decision (min/median/max)")
    print(f"outcomes over the request mix: {', '.join(f'{k} {v}' for k, v in outcomes.items())}")
    print(f"memory per active pair ({used} pairs): {rss_per_pair / 1024:.1f} KiB resident, "
          f"{charged_per_pair / 1024:.1f} KiB charged to the engine's caches")  # fmt: skip
    print(f"replace(): 1,000 new policies {replace_all_ms:.0f} ms (parse + schema validation, once per policy text); "
          f"one policy changed {replace_one_ms:.1f} ms")  # fmt: skip
    payload = {
        "machine": info,
        "goal_p99_us": GOAL_P99_US,
        "verdict": verdict,
        "cpu_verdict": cpu_verdict,
        "figures": figures,
        "outcomes": {str(k): v for k, v in outcomes.items()},
        "slice_sizes": slice_sizes,
        "active_pairs": used,
        "rss_per_pair_bytes": round(rss_per_pair),
        "charged_per_pair_bytes": round(charged_per_pair),
        "load_average_at_end": list(os.getloadavg()),
        "replace_all_ms": round(replace_all_ms, 1),
        "replace_one_ms": round(replace_one_ms, 2),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2))
    print(f"figures written to {output}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls (a few seconds)")
    parser.add_argument("--output", type=Path, default=REPO / ".build" / "bench" / "policy.json")
    args = parser.parse_args(argv)
    sys.exit(run(args.quick, args.output))


if __name__ == "__main__":
    main()
