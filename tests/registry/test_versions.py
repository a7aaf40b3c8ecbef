"""Version constraints: the Python predicate and the SQL the store runs must agree on every version."""

from __future__ import annotations

import random

import asyncpg
import pytest

from agentvault.common.versions import ConstraintError, parse_constraint, parse_version

from ..conftest import Infra

CASES = {
    ">=1.2,<2": {"1.2.0": True, "1.9.9": True, "2.0.0": False, "1.1.9": False, "2.0.0-rc.1": False},
    "^1.4": {"1.4.0": True, "1.99.3": True, "2.0.0": False, "1.3.9": False},
    "^0.2.3": {"0.2.3": True, "0.2.9": True, "0.3.0": False},
    "^0.0.3": {"0.0.3": True, "0.0.4": False},
    "~1.2": {"1.2.0": True, "1.2.99": True, "1.3.0": False},
    "~1": {"1.9.0": True, "2.0.0": False},
    "~=1.4": {"1.4.0": True, "1.9.0": True, "2.0.0": False},
    "~=1.4.2": {"1.4.5": True, "1.5.0": False},
    "1.x": {"1.0.0": True, "1.99.0": True, "2.0.0": False, "0.9.0": False},
    "1.2.*": {"1.2.7": True, "1.3.0": False},
    "*": {"0.0.1": True, "99.0.0": True},
    ">1.2": {"1.2.9": False, "1.3.0": True},
    ">1.2.3": {"1.2.3": False, "1.2.4": True},
    "<=1.2": {"1.2.9": True, "1.3.0": False},
    "=1.2.3": {"1.2.3": True, "1.2.4": False},
    "1.2.3": {"1.2.3": True, "1.2.4": False},
    "!=1.3.0": {"1.3.0": False, "1.3.1": True},
    ">= 1.0.0 < 1.5.0 || ^3": {"1.4.0": True, "2.0.0": False, "3.1.0": True},
    ">=1.2.0-beta": {"1.2.0-beta": True, "1.2.0": True, "1.1.9": False},
    ">=1.2.0": {"1.2.0-beta": False},
}


@pytest.mark.parametrize(("constraint", "expected"), CASES.items())
def test_constraint_semantics(constraint: str, expected: dict[str, bool]) -> None:
    parsed = parse_constraint(constraint)
    assert {v: parsed.matches(v) for v in expected} == expected


@pytest.mark.parametrize("bad", ["", "   ", ">>1", "1.2.3.4", "abc", "!=1.2", "^", "1.2 ||", "x" * 300, "~=1"])
def test_bad_constraints_are_rejected(bad: str) -> None:
    with pytest.raises(ConstraintError):
        parse_constraint(bad)


@pytest.mark.parametrize("bad", ["1.2", "01.2.3", "1.2.3-", "v1.2.3", "1.2.3 ", ""])
def test_bad_versions_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="semantic version"):
        parse_version(bad)


async def test_sql_agrees_with_python(infra: Infra) -> None:
    rng = random.Random(1234)
    versions = sorted(
        {f"{rng.randint(0, 3)}.{rng.randint(0, 5)}.{rng.randint(0, 5)}" for _ in range(200)}
        | {"1.2.0-beta", "2.0.0-rc.1", "0.0.3"}
    )
    conn = await asyncpg.connect(infra.admin_dsn)
    try:
        for text in CASES:
            constraint = parse_constraint(text)
            sql, params = constraint.to_sql("v.a, v.b, v.c, v.d", 5)
            for version in versions:
                key = parse_version(version).key
                in_sql = await conn.fetchval(
                    f"SELECT {sql} FROM (SELECT $1::int a, $2::int b, $3::int c, $4::int d) v", *key, *params
                )
                assert in_sql == constraint.matches(version), (text, version)
    finally:
        await conn.close()
