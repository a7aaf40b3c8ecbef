"""One relevance score for local and federated agents alike, so results from different registries compare."""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass
from typing import Any

from agentvault.registry.v1 import registry_service_pb2 as pb

_WORD = re.compile(r"\w+", re.UNICODE)
MAX_TERMS = 16
# The registry's full-text weights (ts_rank's defaults for A, B, C): the name counts most, then the keywords
# (type, tags, capability names), then the prose. Peers rank with their own engines, so their order is ignored
# and every agent is scored here by the same function.
WEIGHT_NAME = 1.0
WEIGHT_KEYWORDS = 0.4
WEIGHT_PROSE = 0.2
# A prefix match (`summ` for `summarizer`) counts a little less than the whole word, as users expect exact
# words first; the registry matches prefixes too (`term:*`), so both kinds must score.
PREFIX_FACTOR = 0.8


def query_terms(search: str) -> tuple[str, ...]:
    """The search's words, lowercased and deduplicated, at most MAX_TERMS as the registry uses."""
    return tuple(dict.fromkeys(_WORD.findall(search.lower())))[:MAX_TERMS]


def _is_word(char: str) -> bool:
    # Exactly what `\w` matches in a str pattern: Unicode alphanumerics and the underscore.
    return char.isalnum() or char == "_"


def _match(term: str, text: str) -> float:
    """1 when `term` is one of the text's words (split as _WORD splits them), PREFIX_FACTOR when it begins one,
    else 0. Found with str.find rather than by splitting the text: scoring every agent of every peer's answer is
    the aggregator's main cost, and most texts do not contain most terms at all."""
    best = 0.0
    start = text.find(term)
    while start >= 0:
        if start == 0 or not _is_word(text[start - 1]):
            end = start + len(term)
            if end == len(text) or not _is_word(text[end]):
                return 1.0
            best = PREFIX_FACTOR
        start = text.find(term, start + 1)
    return best


def score(agent: pb.Agent, terms: tuple[str, ...]) -> float:
    """Mean over the terms of the best weighted match, in [0, 1]; 0 without terms."""
    if not terms:
        return 0.0
    name = agent.name.lower()
    keywords = " ".join((agent.agent_type, *agent.tags, *(c.name for c in agent.capabilities))).lower()
    prose: str | None = None
    total = 0.0
    for term in terms:
        best = WEIGHT_NAME * _match(term, name)
        if best < WEIGHT_NAME:
            best = max(best, WEIGHT_KEYWORDS * _match(term, keywords))
        if best < WEIGHT_PROSE:
            # Descriptions are the longest field: joined only when the shorter fields did not match.
            if prose is None:
                prose = " ".join((agent.description, *(c.description for c in agent.capabilities))).lower()
            best = max(best, WEIGHT_PROSE * _match(term, prose))
        total += best
    return round(total / len(terms), 6)


@dataclass(frozen=True)
class Candidate:
    """An agent in the merged result list, with where it comes from and its score."""

    agent: pb.Agent
    is_federated: bool
    registry_url: str
    registry_name: str
    score: float

    def sort_key(self) -> tuple[float, int, int, str, str]:
        return self._key

    @functools.cached_property
    def _key(self) -> tuple[float, int, int, str, str]:
        # Best score first; then most recently changed; local before federated; then a total order, so the
        # keyset page token always finds its place again. Cached: candidates of cached answers are reused.
        updated = self.agent.update_time.seconds * 1_000_000 + self.agent.update_time.nanos // 1000
        return (-self.score, -updated, int(self.is_federated), self.agent.did, self.registry_url)

    def position(self) -> list[Any]:
        score, updated, federated, did, url = self.sort_key()
        return [score, updated, federated, did, url]


def merge(local: list[Candidate], federated: list[list[Candidate]]) -> list[Candidate]:
    """Local and peers' agents, unique by DID and sorted: a local agent wins over any peer's copy; among peers
    the copy with the best score wins, the peer listed first on a tie."""
    chosen: dict[str, Candidate] = {}
    for candidate in local:
        chosen.setdefault(candidate.agent.did, candidate)
    best: dict[str, Candidate] = {}
    for answer in federated:
        for candidate in answer:
            did = candidate.agent.did
            if did in chosen:
                continue
            current = best.get(did)
            if current is None or candidate.score > current.score:
                best[did] = candidate
    merged = [*chosen.values(), *best.values()]
    merged.sort(key=Candidate.sort_key)
    return merged


def page(merged: list[Candidate], after: list[Any] | None, size: int) -> tuple[list[Candidate], list[Any] | None]:
    """The `size` candidates after the position `after` (None: from the start), and the position to go on from."""
    start = 0
    if after is not None:
        key = tuple(after)
        start = bisect.bisect_right([c.sort_key() for c in merged], key)
    items = merged[start : start + size]
    more = start + size < len(merged)
    return items, (items[-1].position() if items and more else None)
