"""Two health-monitor replicas on one database share the checks, and no subject is checked twice in an interval."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import asyncpg

from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES, Mesh

from .conftest import DEADLINE, INTERVAL, Peers, until

ROUNDS = 5


async def test_two_replicas_split_the_work_and_never_double_check(peers: Peers, tmp_path: Path) -> None:
    spec = next(s for s in SERVICES if s.name == "health-monitor")
    env = dict(
        peers.a.env,
        HEALTH_MONITOR_PORT=str(free_port()),
        HEALTH_MONITOR_METRICS_PORT=str(free_port()),
        HEALTH_MONITOR_REPLICA_ID="replica-2",
    )
    replica = Mesh(env=env, log_dir=tmp_path / "replica-2", services=(spec,))
    conn = await asyncpg.connect(peers.a.database_url)
    try:
        since: datetime = await conn.fetchval("SELECT now()")
        await asyncio.to_thread(replica.start)

        async def checks() -> list[asyncpg.Record]:
            return await conn.fetch(
                """SELECT subject_kind, subject_id, checked_at, checked_by FROM health_checks
                   WHERE checked_at >= $1 ORDER BY subject_kind, subject_id, checked_at""",
                since,
            )

        def enough(rows: list[asyncpg.Record]) -> bool:
            per_subject: dict[tuple[str, str], int] = defaultdict(int)
            for row in rows:
                per_subject[(row["subject_kind"], row["subject_id"])] += 1
            replicas = {row["checked_by"] for row in rows}
            return replicas == {"replica-1", "replica-2"} and min(per_subject.values(), default=0) >= ROUNDS

        rows = await until(checks, enough, f"{ROUNDS} rounds checked by both replicas", deadline=DEADLINE * 2)
    finally:
        await asyncio.to_thread(replica.stop)
        await conn.close()

    by_subject: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        by_subject[(row["subject_kind"], row["subject_id"])].append(row)
    assert len(by_subject) >= 5
    for subject, history in by_subject.items():
        # Claim times come from the database clock, so a double check would show as a gap under one interval.
        gaps = [(b["checked_at"] - a["checked_at"]).total_seconds() for a, b in itertools.pairwise(history)]
        assert min(gaps) >= INTERVAL * 0.99, (subject, gaps, [r["checked_by"] for r in history])
    # Both replicas did real work, on the same subjects in turn, not on split fixed halves.
    switched = sum(
        1
        for history in by_subject.values()
        for a, b in itertools.pairwise(history)
        if a["checked_by"] != b["checked_by"]
    )
    assert switched > 0
