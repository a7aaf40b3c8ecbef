"""`python -m bench.discovery_fanout_profile`: the aggregator's CPU per peer answer on its fan-out path, in process.

No meshes: peers' answers are built like federation_bench's cold ones (agents carrying a quarter of a vocabulary,
so every query gets a different answer), and each cold search runs what discovery does with them: parse and
validate every peer's answer, its Redis value and federated_agents_cache rows (the JSON the background writer
builds), score, merge, and build the page. `--profile` prints cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Any

from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_discovery import domain, ranking, servicer, store
from agentvault_discovery.answers import Answers
from agentvault_discovery.cache import encode
from agentvault_discovery.grpc_peers import parse_search
from bench.federation_meshes import carries, vocabulary


def peer_answer(peer: int, words: tuple[str, ...], query: tuple[str, str], agents: int) -> bytes:
    """What peer number `peer` answers to `query`: its agents carrying both words, as federation_bench seeds them."""
    found = []
    for i in range(agents):
        if not all(carries(w, i) for w in query):
            continue
        found.append(
            pb.Agent(
                id=f"00000000-0000-4000-8000-{peer:06d}{i:06d}",
                did=f"did:web:peer{peer}.bench.example:agent-{i}",
                name=f"Summarizer {i} of peer {peer}",
                description=f"Agents that summarize documents, meetings and threads; variant {i} of mesh {peer}; "
                + " ".join(w for w in words if carries(w, i)),
                version=f"1.{i % 7}.{i % 3}",
                agent_type="nlp",
                tags=["nlp", "text", f"peer-{peer}"],
                capabilities=[
                    pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name="summarize", version=f"1.{i % 5}.0"),
                    pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="search", version="2.0.0"),
                ],
                endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=f"https://peer{peer}.bench.example/agents/{i}")],
                health_status=pb.HEALTH_STATUS_HEALTHY,
            )
        )
    return fed_pb.SearchAgentsResponse(agents=found, generation=7).SerializeToString()


def one_search(
    answers: Answers,
    targets: list[PeerTarget],
    raws: list[bytes],
    terms: tuple[str, ...],
    page: int,
    upserted: set[tuple[str, bytes]],
) -> int:
    """Discovery's CPU work for one cold search; returns the agents the peers answered. `upserted`: the (peer,
    agent) rows written before, which the federator does not write again within half the cache TTL."""
    filters = domain.Filters()
    candidates = []
    total = 0
    for peer, raw in zip(targets, raws, strict=True):
        answer = answers.answer(peer, raw, parse_search)
        encode(answer)
        for agent, digest in zip(answer.agents, answer.digests, strict=True):
            if (peer.id, digest) not in upserted:
                upserted.add((peer.id, digest))
                store._json(agent)  # the background writer's federated_agents_cache row, in the same process
        total += len(answer.agents)
        candidates.append(
            [
                ranking.Candidate(a, True, peer.registry_url, peer.name, ranking.score(a, terms))
                for a in answer.agents
                if filters.matches(a)
            ]
        )
    merged = servicer.Merged(ranking.merge([], candidates))
    merged.page(None, page)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.discovery_fanout_profile", description=__doc__)
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--agents", type=int, default=50, help="agents per peer (default 50)")
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--page", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25 by own time")
    args = parser.parse_args(argv)
    words = vocabulary(args.searches)
    pairs = [(words[i], words[j]) for i in range(len(words)) for j in range(i + 1, len(words))][: args.searches]
    targets = [
        PeerTarget(
            id=f"00000000-0000-4000-8000-{p:012d}",
            name=f"peer-{p}",
            registry_url=f"http://peer{p}.example",
            api_key="",
            protocol=fed_pb.PEER_PROTOCOL_GRPC,
            grpc_endpoint=f"127.0.0.1:{p}",
            require_mtls=False,
            is_down=False,
            health_status=0,
        )
        for p in range(args.peers)
    ]
    searches: list[tuple[list[bytes], tuple[str, ...]]] = [
        ([peer_answer(p, words, pair, args.agents) for p in range(args.peers)], ranking.query_terms(" ".join(pair)))
        for pair in pairs
    ]
    answers = Answers(50, 64 << 20)
    upserted: set[tuple[str, bytes]] = set()
    profile = cProfile.Profile() if args.profile else None
    agents = 0
    start_cpu, start = time.process_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    for raws, terms in searches:
        agents += one_search(answers, targets, raws, terms, args.page, upserted)
    if profile is not None:
        profile.disable()
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    n = len(searches)
    print(
        f"{n} cold searches x {args.peers} peers, {agents / n / args.peers:.1f} agents per answer: "
        f"{1e3 * cpu / n:.2f} ms CPU per search, {1e6 * cpu / (n * args.peers):.0f} us per peer answer, "
        f"{1e6 * cpu / max(agents, 1):.1f} us per agent (wall {wall:.2f} s)"
    )
    if profile is not None:
        stats: Any = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
