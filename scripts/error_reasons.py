"""Writes the README's table of error reasons from the code (or, with --check, fails when it is out of date).

Every error a handler raises on purpose is an `agentvault.common.errors` class whose reason is a string literal
at the call site; this reads every such call in libs/ and services/ with `ast`, so the table cannot drift.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

import grpc

from agentvault.common import errors
from agentvault_edge.errors import HTTP_STATUS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- error-reasons:begin -->", "<!-- error-reasons:end -->"
SOURCES = ("libs/agentvault", "services")
# The edge's own errors (before any service is called) carry their HTTP status explicitly.
EDGE_HTTP: dict[str, int] = {}


def _error_classes() -> dict[str, grpc.StatusCode]:
    """Each coded error class by name, with its status code."""
    found = {}
    for name in dir(errors):
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, errors.AgentVaultError) and hasattr(value, "status_code"):
            found[name] = value.status_code
    found["InvalidArgument"] = grpc.StatusCode.INVALID_ARGUMENT
    return found


def _constants() -> dict[str, str]:
    """Module-level UPPER_CASE string constants of errors.py (e.g. STORE_UNAVAILABLE), usable as reasons."""
    return {k: v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}


def _literal(node: ast.expr | None, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return None


def _edge_error(node: ast.Call) -> tuple[str, grpc.StatusCode, int] | None:
    """(reason, code, HTTP status) of an `EdgeError(http, grpc.StatusCode.X, text, [_error_info("R"), ...])`."""
    if len(node.args) < 4 or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[1], ast.Attribute):
        return None
    for inner in ast.walk(node.args[3]):
        if isinstance(inner, ast.Call) and getattr(inner.func, "id", "") == "_error_info" and inner.args:
            reason = _literal(inner.args[0], {})
            if reason:
                return reason, grpc.StatusCode[node.args[1].attr], int(node.args[0].value)
    return None


def collect() -> dict[str, tuple[grpc.StatusCode, set[str]]]:
    """reason -> (status code, the services or libraries that raise it)."""
    classes, constants = _error_classes(), _constants()
    reasons: dict[str, tuple[grpc.StatusCode, set[str]]] = {}
    where: dict[str, set[str]] = defaultdict(set)
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            owner = _owner(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if name == "EdgeError" and (edge := _edge_error(node)):
                    reason, code, http = edge
                    EDGE_HTTP[reason] = http
                    reasons.setdefault(reason, (code, set()))
                    where[reason].add(owner)
                    continue
                if name not in classes:
                    continue
                given = node.args[1] if len(node.args) > 1 else None
                given = next((k.value for k in node.keywords if k.arg == "reason"), given)
                reason = _literal(given, constants) if given is not None else None
                if reason is None:
                    reason = getattr(errors, name).default_reason if name != "InvalidArgument" else "INVALID_ARGUMENT"
                reasons.setdefault(reason, (classes[name], set()))
                where[reason].add(owner)
    # Field violations come from every service and the edge alike.
    reasons.setdefault("INVALID_ARGUMENT", (grpc.StatusCode.INVALID_ARGUMENT, set()))
    where["INVALID_ARGUMENT"] = {"every service"}
    return {r: (code, where[r]) for r, (code, _) in reasons.items()}


def _owner(path: Path) -> str:
    relative = path.relative_to(ROOT).parts
    if relative[0] == "services":
        return relative[1].removeprefix("agentvault_")
    return "libs (" + relative[2] + ")" if len(relative) > 3 else "libs"


def table() -> str:
    rows = ["| reason | gRPC status | HTTP | raised by |", "| --- | --- | --- | --- |"]
    for reason, (code, owners) in sorted(collect().items()):
        http = EDGE_HTTP.get(reason) or HTTP_STATUS.get(code, 500)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and reason.endswith("_TOO_LARGE"):
            http = 413  # the edge's rule (agentvault_edge.errors.from_rpc_error): too big, not too many
        rows.append(f"| `{reason}` | `{code.name}` | {http} | {', '.join(sorted(owners))} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when README.md's table is out of date")
    args = parser.parse_args()
    current = README.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's error reasons are out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
