"""The layering rules: services talk only through protos/, shared code lives in libs/, and each module logs under
its own name, so a reader finds a log line's source and an operator can tune one module's level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p for p in (ROOT / "services").iterdir() if p.is_dir() and (p / "__init__.py").exists())


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("service", SERVICES, ids=lambda p: p.name)
def test_no_service_imports_another(service: Path) -> None:
    others = {p.name for p in SERVICES} - {service.name}
    offenders = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in service.rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] in others
    }
    assert not offenders, "services talk through protos/; shared code belongs in libs/:\n" + "\n".join(
        sorted(offenders)
    )


def test_libs_import_no_service() -> None:
    services = {p.name for p in SERVICES}
    offenders = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in (ROOT / "libs").rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in services
    }
    assert not offenders, "\n".join(sorted(offenders))


def test_module_loggers_are_named_by_module() -> None:
    offenders = []
    for path in [*(ROOT / "services").rglob("*.py"), *(ROOT / "libs").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "getLogger"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: getLogger({node.args[0].value!r})")
    # logs.py configures third-party loggers by their own names; nothing else names a logger by hand.
    offenders = [o for o in offenders if not o.startswith("libs/agentvault/common/logs.py")]
    assert not offenders, "use logging.getLogger(__name__):\n" + "\n".join(offenders)
