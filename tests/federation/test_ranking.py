"""Discovery's pure parts: validating peers' agents, scoring, merging by DID and keyset paging."""

from __future__ import annotations

import random
import re
from typing import Any

from agentvault.common import versions
from agentvault.common.enums import enum_words
from agentvault.common.peers import PeerTarget
from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_discovery import domain, ranking
from agentvault_discovery.answers import Answers
from agentvault_discovery.grpc_peers import parse_search

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


def test_peer_enum_words_are_the_shared_mapping_read_leniently() -> None:
    # One mapping for the whole mesh (agentvault.common.enums), not a copy that can drift from the protos.
    assert domain.KIND_WORDS is enum_words(pb.CapabilityKind.DESCRIPTOR)
    assert domain.PROTOCOL_WORDS is enum_words(pb.Protocol.DESCRIPTOR)
    assert domain.HEALTH_WORDS is enum_words(pb.HealthStatus.DESCRIPTOR)
    # Every spelling a registry may use is read; anything else is "not set" (0), never an error: validation
    # then refuses that one agent, not the peer's whole answer.
    # A list, not a dict: True and 1.0 are equal keys.
    protocols: list[tuple[Any, int]] = [
        (" Http ", pb.PROTOCOL_HTTP),
        ("PROTOCOL_MCP", pb.PROTOCOL_MCP),
        ("protocol_a2a", pb.PROTOCOL_A2A),
        (pb.PROTOCOL_GRPC, pb.PROTOCOL_GRPC),
        ("carrier-pigeon", 0),
        ("PROTOCOL_", 0),
        ("x" * 65, 0),
        (True, 0),
        (999, 0),
        (1.0, 0),
        (None, 0),
    ]
    for value, number in protocols:
        raw = {**VALID_PEER_AGENT, "endpoints": [{"protocol": value, "url": "https://rest-peer.example/valid"}]}
        parsed = domain.agent_from_json(raw)
        assert parsed is not None and parsed.endpoints[0].protocol == number, value
        assert (domain.sanitize(parsed) is not None) == bool(number), value
    for health, number in {"DEGRADED": pb.HEALTH_STATUS_DEGRADED, "sick": 0, 3: pb.HEALTH_STATUS_UNHEALTHY}.items():
        parsed = domain.agent_from_json({**VALID_PEER_AGENT, "health_status": health})
        assert parsed is not None and parsed.health_status == number, health
        clean = domain.sanitize(parsed)
        assert clean is not None and clean.health_status == number, health
    parsed = domain.agent_from_json({**VALID_PEER_AGENT, "capabilities": [{"kind": "gadget", "name": "t"}]})
    assert parsed is not None and parsed.capabilities[0].kind == 0
    assert domain.sanitize(parsed) is None


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


def _reference_score(a: pb.Agent, terms: tuple[str, ...]) -> float:
    """The scoring rule written plainly: split every field into its words, then match each term against them."""
    if not terms:
        return 0.0

    def words(*texts: str) -> set[str]:
        return {w for t in texts for w in re.findall(r"\w+", t.lower())}

    def match(term: str, found: set[str]) -> float:
        return 1.0 if term in found else (ranking.PREFIX_FACTOR if any(w.startswith(term) for w in found) else 0.0)

    name = words(a.name)
    keywords = words(a.agent_type, *a.tags, *(c.name for c in a.capabilities))
    prose = words(a.description, *(c.description for c in a.capabilities))
    total = 0.0
    for term in terms:
        total += max(
            ranking.WEIGHT_NAME * match(term, name),
            ranking.WEIGHT_KEYWORDS * match(term, keywords),
            ranking.WEIGHT_PROSE * match(term, prose),
        )
    return round(total / len(terms), 6)


def test_score_is_the_plain_rule_for_any_text() -> None:
    # Scoring looks terms up in the text instead of splitting it: it must agree with splitting, at word
    # boundaries of every kind (punctuation, underscores, digits, non-ASCII letters and marks, case changes).
    rng = random.Random(9)
    pieces = ["sum", "summ", "summarize", "SUMMARIZER", "_sum", "sum_", "x", "9sum", "sum9", "Ünï", "ünïcode", "é"]
    pieces += ["İstanbul", "i̇", "straße", "STRASSE", "日本", "日本語", "-", ".", "/", " ", "  ", ":", "a2a", "ab"]
    terms_pool = ["sum", "summarize", "summ", "x", "9sum", "ünï", "ünïcode", "i", "stra", "straße", "日本", "a2a", "ab"]

    def text(n: int) -> str:
        return "".join(rng.choice(pieces) + rng.choice(["", " ", "-", "_"]) for _ in range(rng.randint(0, n)))

    for _ in range(3000):
        a = pb.Agent(
            name=text(4),
            description=text(12),
            agent_type=text(2),
            tags=[text(2) for _ in range(rng.randint(0, 3))],
            capabilities=[pb.Capability(name=text(2), description=text(6)) for _ in range(rng.randint(0, 2))],
        )
        terms = tuple(dict.fromkeys(rng.sample(terms_pool, rng.randint(0, 3))))
        assert ranking.score(a, terms) == _reference_score(a, terms), (a, terms)


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


def test_an_agent_in_different_answers_is_validated_once() -> None:
    peer = PeerTarget(
        "p1", "Peer", "https://peer.example", fed_pb.PEER_PROTOCOL_GRPC, "peer:50051", False, "", False, 0
    )
    answers = Answers(max_results_per_peer=50, budget=1 << 20)
    a, b = agent("did:web:x.example:a", "A"), agent("did:web:x.example:b", "B")
    first = answers.answer(peer, fed_pb.SearchAgentsResponse(agents=[a]).SerializeToString(), parse_search)
    second = answers.answer(peer, fed_pb.SearchAgentsResponse(agents=[b, a]).SerializeToString(), parse_search)
    assert [x.did for x in second.agents] == [b.did, a.did]
    # The same validated agent, not a second validation of it; a changed agent is validated anew.
    assert second.agents[1] is first.agents[0] and second.digests[1] == first.digests[0]
    changed = agent("did:web:x.example:a", "A renamed")
    third = answers.answer(peer, fed_pb.SearchAgentsResponse(agents=[changed]).SerializeToString(), parse_search)
    assert third.agents[0].name == "A renamed" and third.digests[0] != first.digests[0]
    # Refused agents are not kept.
    before = answers.memo_bytes
    bad = agent("not a did", "Bad")
    refused = answers.answer(peer, fed_pb.SearchAgentsResponse(agents=[bad]).SerializeToString(), parse_search)
    assert refused.agents == [] and refused.invalid == 1
    assert answers.memo_bytes - before < 1024  # the (empty) answer only


def test_a_peers_capability_schemas_and_skill_fields_are_validated_like_a_local_registration() -> None:
    def with_capability(**fields: Any) -> pb.Agent:
        return agent(
            "did:web:peer.example:a",
            "A",
            capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name="s", **fields)],
        )

    good = domain.sanitize(with_capability(input_schema='{"type": "object"}', permissions=["tools:invoke"], title="S"))
    assert good is not None and good.capabilities[0].input_schema == '{"type": "object"}'
    # Each of these would be refused at CreateAgent, so a peer's agent carrying one is dropped, not passed on.
    for fields in (
        {"input_schema": "{not json"},
        {"output_schema": '{"type": "no-such-type"}'},
        {"input_schema": '{"properties": ' * 40 + "{}" + "}" * 40},
        {"input_schema": '{"type": "string", "pattern": "(?=lookahead)"}'},
        {"title": "x" * 10_000},
        {"permissions": ["p"] * 1_000},
        {"tags": ["t"] * 1_000},
        {"input_modes": ["text/plain"] * 1_000},
    ):
        assert domain.sanitize(with_capability(**fields)) is None, fields
