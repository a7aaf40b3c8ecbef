"""`python -m bench.edge_json_bench`: the edge's CPU to encode a search of 10 agents and a get, without I/O.

Pure CPU on realistic registry messages (3 capabilities, 2 endpoints, 5 tags, both timestamps set): the edge's
proto -> JSON conversion plus its `dumps`, in µs per response, next to the ceiling, a `json.dumps` of the same
already-built dict (what any encoder must at least pay). Thread CPU time, best of several rounds, so that other
processes on the shared cores move the figures as little as possible.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_edge.json_out import dumps, response_to_json


def agent(i: int) -> pb.Agent:
    """One agent as the registry returns it, with text of realistic length."""
    msg = pb.Agent(
        id=f"6f1c2a4e-0b7d-4c59-9a3e-{i:012d}",
        did=f"did:web:agents.example.com:team-{i % 7}:agent-{i}",
        name=f"Summarizer {i}",
        description="Summarizes long documents into short briefs; handles PDF, HTML and plain text input.",
        version="1.4.2",
        agent_type="nlp",
        tags=["nlp", "summary", "documents", f"team-{i % 7}", "prod"],
        owner=f"prn_3f9c8a7b6d5e4f30{i:08d}",
        sharing=pb.SHARING_FEDERATED if i % 2 else pb.SHARING_LOCAL,
        health_check_url=f"https://agents.example.com/agent-{i}/healthz",
        health_status=pb.HEALTH_STATUS_HEALTHY,
    )
    for kind, name in ((pb.CAPABILITY_KIND_SKILL, "summarize"), (pb.CAPABILITY_KIND_TOOL, "pdf-reader")):
        msg.capabilities.add(kind=kind, name=name, version="2.0.1", description=f"The {name} capability.")
    msg.capabilities.add(kind=pb.CAPABILITY_KIND_MODEL, name="small-llm", version="", description="")
    msg.endpoints.add(protocol=pb.PROTOCOL_HTTP, url=f"https://agents.example.com/agent-{i}")
    msg.endpoints.add(protocol=pb.PROTOCOL_GRPC, url=f"grpc://agents.example.com:443/agent-{i}")
    msg.create_time.FromSeconds(1_700_000_000 + i)
    msg.update_time.FromJsonString(f"2024-03-05T10:{i % 60:02d}:07.123456Z")
    return msg


def per_call_us(fn: Callable[[], Any], *, calls: int, rounds: int) -> float:
    """Best-of-`rounds` thread CPU time per call, in µs."""
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, time.thread_time() - start)
    return best / calls * 1e6


def edge_dumps(msg: Any) -> bytes:
    """What the edge does with a backend's reply: the JSON value, then its bytes."""
    return dumps(response_to_json(msg))


def ceiling_dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def measure(calls: int, rounds: int) -> dict[str, dict[str, float]]:
    search = pb.ListAgentsResponse(agents=[agent(i) for i in range(10)], next_page_token="eyJvZmZzZXQiOjEwfQ")
    one = agent(42)
    figures: dict[str, dict[str, float]] = {}
    for label, msg in (("search_10", search), ("get", one)):
        as_dict = response_to_json(msg)
        # The output must be the ceiling's output, byte for byte, or the comparison means nothing.
        assert edge_dumps(msg) == ceiling_dumps(as_dict)
        edge = per_call_us(functools.partial(edge_dumps, msg), calls=calls, rounds=rounds)
        ceiling = per_call_us(functools.partial(ceiling_dumps, as_dict), calls=calls, rounds=rounds)
        figures[label] = {"edge_us": edge, "ceiling_us": ceiling, "ratio": edge / ceiling}
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per round (default 500)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best is kept (default 7)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = measure(args.calls, args.rounds)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for label, row in figures.items():
        print(
            f"{label:10s} edge {row['edge_us']:8.1f} µs   json.dumps ceiling {row['ceiling_us']:7.1f} µs"
            f"   edge/ceiling {row['ratio']:5.2f}x"
        )


if __name__ == "__main__":
    main()
