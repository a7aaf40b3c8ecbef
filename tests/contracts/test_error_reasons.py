"""The README's table of error reasons is the code's: every reason raised is listed, with its status."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("error_reasons", ROOT / "scripts" / "error_reasons.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_lists_every_reason_the_code_raises() -> None:
    reasons = load()
    readme = (ROOT / "README.md").read_text()
    assert reasons.render(readme) == readme, "run `make docs`"
    rows = reasons.table()
    # A few that must be there, each with the HTTP status a client sees.
    for row in (
        "| `AGENT_NOT_FOUND` | `NOT_FOUND` | 404 |",
        "| `STORE_UNAVAILABLE` | `UNAVAILABLE` | 503 |",
        "| `HEADERS_TOO_LARGE` | `INVALID_ARGUMENT` | 431 |",
        "| `PRINCIPAL_NOT_FOUND` | `NOT_FOUND` | 404 |",
    ):
        assert row in rows


def test_a_missing_row_is_noticed() -> None:
    reasons = load()
    readme = (ROOT / "README.md").read_text()
    stale = "\n".join(line for line in readme.splitlines() if "`NOT_OWNER`" not in line) + "\n"
    assert stale != readme
    assert reasons.render(stale) != stale
