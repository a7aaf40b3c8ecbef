"""Discovery's pure parts: validating peers' agents, scoring, merging by DID and keyset paging."""

from __future__ import annotations

from typing import Any

from agentvault.common import versions
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_discovery import domain, ranking

from .conftest import INVALID_PEER_AGENTS, VALID_PEER_AGENT


def agent(did: str, name: str, **fields: Any) -> pb.Agent:
    return pb.Agent(did=did, name=name, version="1.0.0", **fields)


def test_rest_json_is_parsed_leniently_and_validated_strictly() -> None:
    parsed = domain.agent_from_json(VALID_PEER_AGENT)
    assert parsed is not None
    clean = domain.sanitize(parsed)
    assert clean is not None
    assert clean.capabilities[0].kind == pb.CAPABILITY_KIND_TOOL
    assert clean.health_status == pb.HEALTH_STATUS_HEALTHY
    assert clean.owner == ""  # never carried over from a peer
    for raw in INVALID_PEER_AGENTS:
        parsed = domain.agent_from_json(raw)
        assert parsed is None or domain.sanitize(parsed) is None, raw
    # Enum spellings other registries use are all accepted.
    for kind in ("tool", "TOOL", "CAPABILITY_KIND_TOOL", 1):
        raw = {**VALID_PEER_AGENT, "capabilities": [{"kind": kind, "name": "t"}]}
        parsed = domain.agent_from_json(raw)
        assert parsed is not None and domain.sanitize(parsed) is not None, kind


def test_sanitize_drops_fields_a_peer_must_not_set() -> None:
    raw = agent(
        "did:web:x.example:a",
        "A",
        owner="alice",
        sharing=pb.SHARING_PRIVATE,
        health_check_url="http://10.0.0.1/internal",
        id="x" * 500,
        health_status=99,
    )
    clean = domain.sanitize(raw)
    assert clean is not None
    assert (clean.owner, clean.sharing, clean.health_check_url, clean.id, clean.health_status) == ("", 0, "", "", 0)
    assert domain.sanitize(agent("did:web:x.example:a", "A", capabilities=[pb.Capability(name="no-kind")])) is None


def test_filters_are_reapplied_to_peer_answers() -> None:
    a = agent(
        "did:web:x.example:f",
        "F",
        agent_type="nlp",
        tags=["text"],
        capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name="summarize", version="1.4.0")],
    )
    assert domain.Filters(agent_type="nlp", tag="text").matches(a)
    assert not domain.Filters(agent_type="vision").matches(a)
    assert not domain.Filters(healthy_only=True).matches(a)
    constraint = versions.parse_constraint(">=1.2,<2")
    assert domain.Filters(capability_name="summarize", capability_version=constraint).matches(a)
    too_new = versions.parse_constraint(">=2")
    assert not domain.Filters(capability_name="summarize", capability_version=too_new).matches(a)
    assert not domain.Filters(capability_kind=pb.CAPABILITY_KIND_TOOL, capability_name="summarize").matches(a)


def test_cache_hash_covers_every_parameter_that_changes_the_answer() -> None:
    base = domain.PeerQuery(search="nlp", limit=50)
    variants = [
        domain.PeerQuery(search="nlp", limit=10),
        domain.PeerQuery(search="nlp", agent_type="x", limit=50),
        domain.PeerQuery(search="nlp", tag="x", limit=50),
        domain.PeerQuery(search="nlp", capability_kind=1, limit=50),
        domain.PeerQuery(search="nlp", capability_name="x", limit=50),
        domain.PeerQuery(search="nlp", capability_version="1.x", limit=50),
        domain.PeerQuery(search="nlpx", limit=50),
    ]
    hashes = {v.cache_hash() for v in variants}
    assert len(hashes) == len(variants) and base.cache_hash() not in hashes
    assert base.cache_hash() == domain.PeerQuery(search="nlp", limit=50).cache_hash()


def test_score_weights_name_over_keywords_over_prose() -> None:
    terms = ranking.query_terms("Summarize")
    in_name = agent("did:web:x:1", "Summarize bot")
    in_tags = agent("did:web:x:2", "Bot", tags=["summarize"])
    in_prose = agent("did:web:x:3", "Bot", description="can summarize text")
    prefix = agent("did:web:x:4", "Summarizer")
    nothing = agent("did:web:x:5", "Bot")
    scores = [ranking.score(a, terms) for a in (in_name, prefix, in_tags, in_prose, nothing)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 5
    assert scores[0] == 1.0 and scores[-1] == 0.0


def test_merge_keeps_local_copies_and_the_best_peer_copy() -> None:
    def cand(did: str, score: float, federated: bool, url: str) -> ranking.Candidate:
        return ranking.Candidate(agent(did, did), federated, url, url, score)

    local = [cand("did:x:a", 0.1, False, "local")]
    peer_1 = [cand("did:x:a", 0.9, True, "p1"), cand("did:x:b", 0.5, True, "p1")]
    peer_2 = [cand("did:x:b", 0.7, True, "p2"), cand("did:x:c", 0.5, True, "p2")]
    merged = ranking.merge(local, [peer_1, peer_2])
    expected = [("did:x:b", "p2"), ("did:x:c", "p2"), ("did:x:a", "local")]
    assert [(c.agent.did, c.registry_url) for c in merged] == expected


def test_keyset_pages_cover_the_list_exactly_once() -> None:
    merged = ranking.merge(
        [ranking.Candidate(agent(f"did:x:{i}", "n"), False, "", "", i % 3 / 3) for i in range(10)], []
    )
    seen = []
    after = None
    while True:
        items, after = ranking.page(merged, after, 3)
        seen += [c.agent.did for c in items]
        if after is None:
            break
    assert seen == [c.agent.did for c in merged]
