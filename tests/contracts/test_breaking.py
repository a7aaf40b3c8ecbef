"""The breaking-change check of the protos (`make proto-breaking`, part of `make lint`): quiet for the contracts
as they are, loud for a change that would break clients of the last release."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = shutil.which("buf", path=str(ROOT / ".venv" / "bin")) or shutil.which("buf")
REGISTRY_PROTO = Path("protos/agentvault/registry/v1/registry_service.proto")


def breaking(tree: Path) -> subprocess.CompletedProcess[str]:
    """Builds `tree`'s protos into an image and checks it against the committed release baseline."""
    assert BUF is not None, "buf is installed with the dev extras"
    image = tree / ".build" / "check.json"
    image.parent.mkdir(exist_ok=True)
    subprocess.run([BUF, "build", "--exclude-source-info", "-o", str(image)], cwd=tree, check=True, timeout=120)
    return subprocess.run(
        [BUF, "breaking", str(image), "--against", str(ROOT / "protos" / "released.json"), "--exclude-imports"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the module's protos and buf.yaml, free to be changed."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / ".build" / "protodeps", tmp_path / ".build" / "protodeps")
    return tmp_path


def test_current_protos_keep_the_release_contract(tree: Path) -> None:
    result = breaking(tree)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # A field's type changes: old clients would misread it.
        (lambda s: s.replace("string owner = 10", "int64 owner = 10"), "owner"),
        # A field disappears without being reserved: its number could be reused with another meaning.
        (lambda s: re.sub(r"\n\s*string agent_type = 6;", "\n", s, count=1), "agent_type"),
        # A method is removed: every client calling it would fail.
        (lambda s: re.sub(r"rpc DeleteAgent\(.*?\n  }\n", "", s, count=1, flags=re.S), "DeleteAgent"),
    ],
)
def test_a_breaking_change_fails_loudly(tree: Path, change: object, expected: str) -> None:
    path = tree / REGISTRY_PROTO
    before = path.read_text()
    after = change(before)  # type: ignore[operator]
    assert after != before, "the change must apply to the current proto"
    path.write_text(after)
    result = breaking(tree)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout
