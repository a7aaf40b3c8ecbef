"""A realistic, reproducible agent population, and bulk seeding that writes rows exactly as the Store does.

Agents are built as domain.AgentSpec and checked with domain.validate_spec; their row values come from the
Store's own helpers (Store._agent_params, store._texts, store.capability_rows).
Only the tsvector expression is repeated here (it is inline SQL in store.py); `check_search_vectors` proves it
still matches by running the Store's own INSERT for sampled agents inside a rolled-back transaction.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg

from agentvault.common import agents as domain
from agentvault_registry import store
from agentvault_registry.store import Store

SEED = 20_240_601
VOCABULARY_SIZE = 5000
AGENT_TYPES = ("assistant", "nlp", "vision", "planner", "retriever", "coder")
SHARING_WEIGHTS = {"local": 60, "federated": 30, "private": 10}
OWNERS = 40
CAPABILITY_NAMES = 300
TAGS = 200

_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "pl", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "x", "m")


def vocabulary(size: int = VOCABULARY_SIZE, seed: int = SEED) -> list[str]:
    """Distinct pronounceable pseudo-words of 2-3 syllables: no stop words, few shared prefixes."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < size:
        syllables = rng.choice((2, 3, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        words.setdefault(word, None)
    return list(words)


@dataclass(frozen=True)
class Population:
    words: list[str]
    capability_names: list[str]
    tags: list[str]

    @classmethod
    def build(cls, seed: int = SEED) -> Population:
        words = vocabulary(seed=seed)
        rng = random.Random(seed + 1)
        capability_names = list(dict.fromkeys(f"{rng.choice(words)}-{rng.choice(words)}" for _ in range(400)))
        tags = list(dict.fromkeys(rng.choice(words) for _ in range(400)))
        return cls(words, capability_names[:CAPABILITY_NAMES], tags[:TAGS])


def _semver(rng: random.Random) -> str:
    core = f"{rng.choice((0, 1, 1, 1, 2, 2, 3, 4))}.{rng.randint(0, 20)}.{rng.randint(0, 30)}"
    return core + "-beta.1" if rng.random() < 0.1 else core


def _capability_name(rng: random.Random, names: Sequence[str]) -> str:
    # Skewed like real tool names: a few are everywhere, most are rare.
    return names[min(int(rng.paretovariate(1.0)) - 1, len(names) - 1)] if rng.random() < 0.5 else rng.choice(names)


def agent_spec(index: int, population: Population, rng: random.Random) -> domain.AgentSpec:
    words = population.words
    capabilities: dict[tuple[str, str], domain.Capability] = {}
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(domain.CAPABILITY_KINDS)
        name = _capability_name(rng, population.capability_names)
        version = "" if rng.random() < 0.1 else _semver(rng)
        text = " ".join(rng.choices(words, k=rng.randint(3, 6)))
        capabilities[(kind, name)] = domain.Capability(kind, name, version, text)
    host = f"agent-{index}.bench.example"
    return domain.AgentSpec(
        did=f"did:web:bench.example:agent-{index}",
        name=" ".join(rng.choices(words, k=rng.randint(2, 4))).title(),
        description=" ".join(rng.choices(words, k=rng.randint(8, 20))) + ".",
        version=_semver(rng),
        agent_type=rng.choice(AGENT_TYPES),
        capabilities=tuple(capabilities.values()),
        endpoints=tuple(
            domain.Endpoint(protocol, f"https://{host}/{protocol}")
            for protocol in rng.sample(("http", "grpc", "a2a", "mcp"), rng.randint(1, 2))
        ),
        tags=tuple(rng.sample(population.tags, rng.randint(0, 4))),
        sharing=rng.choices(list(SHARING_WEIGHTS), weights=list(SHARING_WEIGHTS.values()))[0],
        health_check_url=f"https://{host}/healthz" if rng.random() < 0.5 else "",
    )


@dataclass(frozen=True)
class SeededAgent:
    id: uuid.UUID
    owner: str
    spec: domain.AgentSpec


def generate(start: int, count: int, population: Population, seed: int = SEED) -> Iterator[SeededAgent]:
    """Agents number start..start+count-1; the same numbers always give the same agents."""
    for index in range(start, start + count):
        rng = random.Random(seed * 1_000_003 + index)
        spec = domain.validate_spec(agent_spec(index, population, rng))
        yield SeededAgent(uuid.UUID(int=rng.getrandbits(128), version=4), owner_id(index % OWNERS), spec)


def owner_id(number: int) -> str:
    """The principal id of seeded owner `number` (agents.owner references principals)."""
    return f"prn_{number:032x}"


_STAGE_COLUMNS = (
    "id, did, name, description, version, agent_type, capabilities, endpoints, tags, owner, sharing, "
    "health_check_url, created_at, keywords, prose"
)


async def seed(conn: asyncpg.Connection, agents: Sequence[SeededAgent], now: datetime | None = None) -> None:
    """Bulk-writes agents and their capabilities: COPY into a staging table, then one INSERT ... SELECT that
    computes search_vector with the Store's expression. The connection needs store.init_connection."""
    now = now or datetime.now(UTC)
    rng = random.Random(SEED + len(agents))
    stage = []
    for agent in agents:
        keywords, prose = store._texts(agent.spec)
        # Store._agent_params: (did, name, description, version, agent_type, capabilities, endpoints, tags).
        # JSONB goes through the staging table as the text the Store's codec (json.dumps) would send.
        did, name, description, version, agent_type, caps, endpoints, tags = Store._agent_params(agent.spec)
        params = (did, name, description, version, agent_type, json.dumps(caps), json.dumps(endpoints), tags)
        created = now - timedelta(seconds=rng.randint(0, 365 * 86400))
        stage.append(
            (agent.id, *params, agent.owner, agent.spec.sharing, agent.spec.health_check_url, created, keywords, prose)
        )
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO principals (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            [(owner, f"bench-{owner[-4:]}") for owner in sorted({agent.owner for agent in agents})],
        )
        await conn.execute(
            """CREATE TEMP TABLE bench_stage (
                   id UUID, did TEXT, name TEXT, description TEXT, version TEXT, agent_type TEXT,
                   capabilities TEXT, endpoints TEXT, tags TEXT[], owner TEXT, sharing TEXT,
                   health_check_url TEXT, created_at TIMESTAMPTZ, keywords TEXT, prose TEXT
               ) ON COMMIT DROP"""
        )
        await conn.copy_records_to_table("bench_stage", records=stage, columns=_STAGE_COLUMNS.split(", "))
        # Same expression as Store._insert: name 'A', keywords 'B', prose 'C', english configuration.
        await conn.execute(
            """INSERT INTO agents (id, did, name, description, version, agent_type, capabilities, endpoints, tags,
                    owner, sharing, health_check_url, created_at, updated_at, search_vector)
                SELECT id, did, name, description, version, agent_type, capabilities::jsonb, endpoints::jsonb, tags,
                    owner, sharing, health_check_url, created_at, created_at,
                    setweight(to_tsvector('english', name), 'A') ||
                    setweight(to_tsvector('english', keywords), 'B') ||
                    setweight(to_tsvector('english', prose), 'C')
                FROM bench_stage"""
        )
        await conn.copy_records_to_table(
            "agent_capabilities",
            records=[row for agent in agents for row in store.capability_rows(agent.id, agent.spec)],
            columns=store.CAPABILITY_COLUMNS,
        )


async def vacuum_analyze(conn: asyncpg.Connection) -> None:
    """What autovacuum would have done by the time a real registry held this many agents."""
    await conn.execute("VACUUM (ANALYZE) agents")
    await conn.execute("VACUUM (ANALYZE) agent_capabilities")


class _SqlCapture:
    """Stands in for the asyncpg pool to capture the SQL the Store would run."""

    def __init__(self) -> None:
        self.sql = ""
        self.params: tuple[Any, ...] = ()

    async def fetch(self, sql: str, *params: Any) -> list[Any]:
        self.sql, self.params = sql, params
        return []


async def list_agents_sql(raw_query: dict[str, Any], page_size: int = 50) -> tuple[str, tuple[Any, ...]]:
    """The exact statement Store.list_agents runs for an anonymous caller's first page."""
    capture = _SqlCapture()
    await Store(cast(asyncpg.Pool, capture)).list_agents(domain.build_query(raw_query), None, page_size, None)
    return capture.sql, capture.params


async def check_search_vectors(conn: asyncpg.Connection, agents: Sequence[SeededAgent]) -> int:
    """Inserts each sampled agent again through Store._insert (rolled back) and compares search_vector.

    Returns how many differ (0 when the bulk expression still matches store.py)."""
    differ = 0
    for agent in agents:
        tr = conn.transaction()
        await tr.start()
        try:
            spec = replace(agent.spec, did=agent.spec.did + "-check")
            row = await Store(cast(asyncpg.Pool, None))._insert(conn, agent.owner, spec)
            same = await conn.fetchval(
                "SELECT (SELECT search_vector FROM agents WHERE id = $1) = (SELECT search_vector FROM agents"
                " WHERE id = $2)",
                row["id"],
                agent.id,
            )
            differ += 0 if same else 1
        finally:
            await tr.rollback()
    return differ
