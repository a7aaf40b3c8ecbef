"""Figures, the goals they are judged against, and their presentation as a table and as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The targets. They live here, in the benchmark, and never in the tests.
GET_AGENT_VS_ECHO = 0.70  # GetAgent throughput at least this share of the bare gRPC echo ceiling
SEARCH_P99_MS = 20.0  # search p99 at the service, over 100k agents
GOAL_SIZE = 100_000  # the population the search goal is stated for
# CPU per request through the edge, summed over the edge, the registry and PostgreSQL, in milliseconds.
EDGE_SEARCH_CPU_MS = 0.6  # a search answering 10 agents
EDGE_GET_CPU_MS = 0.3  # a get by id


@dataclass
class Figure:
    section: str
    name: str
    throughput: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    goal: str = ""
    verdict: str = ""  # PASS, MISS or "" when the figure has no goal
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def judge(figure: Figure, goal: str, passed: bool) -> None:
    figure.goal = goal
    figure.verdict = "PASS" if passed else "MISS"


def _num(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{name[:3]}{value:.0f}" for name, value in cpu.items())


def table(figures: list[Figure]) -> str:
    header = ("benchmark", "req/s", "p50 ms", "p99 ms", "err", "CPU % of a core", "goal", "")
    rows: list[tuple[str, ...]] = []
    section = None
    lines: list[str] = []
    for f in figures:
        if f.section != section:
            section = f.section
            rows.append((f"[{section}]", "", "", "", "", "", "", ""))
        rows.append(
            (
                "  " + f.name,
                _num(f.throughput, 0),
                _num(f.p50_ms, 2),
                _num(f.p99_ms, 2),
                str(f.errors) if f.throughput is not None else "",
                _cpu(f.cpu),
                f.goal,
                f.verdict,
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 3, 4}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(r) for r in rows)
    lines.append(
        "CPU: cli = load client, ser = echo or registry process, db = all PostgreSQL processes, edg = edge,"
        " oth = every other process on the machine (above ~10, the figure is disturbed); 100 = one core busy"
    )
    notes = [f"  {f.section} / {f.name}: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any], figures: list[Figure]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = clean_nan({**payload, "figures": [asdict(f) for f in figures]})
    path.write_text(json.dumps(document, indent=2, default=str, allow_nan=False) + "\n")


def clean_nan(value: Any) -> Any:
    """JSON has no NaN: replaces it with None, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_nan(v) for v in value]
    return value
