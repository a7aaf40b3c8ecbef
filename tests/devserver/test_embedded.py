"""The embedded PostgreSQL owns exactly the server it starts: one owner per folder, leftovers stopped, none left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentvault.devserver.embedded import EmbeddedPostgres, InUse


def postmasters(folder: Path) -> list[int]:
    """Live postmasters serving `folder` (zombies have no command line, so they do not count)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args[0].endswith(b"/postgres") and str(folder).encode() in args:
                found.append(int(entry))
    return found


@pytest.fixture
def folder() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="agentvault-embedded-"))
    root.chmod(0o755)
    yield root / "pg"
    for pid in postmasters(root / "pg"):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def test_one_owner_per_folder_and_a_leftover_is_stopped(folder: Path) -> None:
    # An owner that dies without stopping its server (SIGKILL) leaves the postmaster running.
    script = textwrap.dedent(f"""
        from pathlib import Path
        from agentvault.devserver.embedded import EmbeddedPostgres
        pg = EmbeddedPostgres(Path({str(folder)!r}), max_connections=50)
        pg.start()
        print(pg.pid, flush=True)
        input()
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    leftover = int(owner.stdout.readline())
    assert postmasters(folder) == [leftover]

    with pytest.raises(InUse, match="in use by another process"):
        EmbeddedPostgres(folder).start()
    assert postmasters(folder) == [leftover], "a second owner touches nothing"

    owner.kill()
    owner.wait()
    assert postmasters(folder) == [leftover], "the postmaster outlived its owner"

    pg = EmbeddedPostgres(folder, max_connections=60)
    pg.start()
    try:
        assert pg.pid != leftover and postmasters(folder) == [pg.pid]
        # Set on the command line: no restart (and so no second postmaster) to change it.
        assert b"max_connections=60" in Path(f"/proc/{pg.pid}/cmdline").read_bytes().split(b"\0")
    finally:
        pg.stop()
    assert postmasters(folder) == [], "stop() returns once its server has exited"


def test_a_bench_stopped_with_sigterm_leaves_no_postgres(folder: Path) -> None:
    # What every bench does: a throw-away server, stopped in a finally block that SIGTERM must reach too.
    script = textwrap.dedent(f"""
        from pathlib import Path
        from agentvault.devserver.embedded import EmbeddedPostgres
        from bench.procs import sigterm_as_interrupt
        with sigterm_as_interrupt():
            pg = EmbeddedPostgres(Path({str(folder)!r}), delete_on_stop=True)
            try:
                pg.start()
                print(pg.pid, flush=True)
                input()
            finally:
                pg.stop()
    """)
    repo = Path(__file__).resolve().parents[2]
    bench = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo
    )
    assert bench.stdout is not None
    postmaster = int(bench.stdout.readline())
    assert postmasters(folder) == [postmaster]
    bench.send_signal(signal.SIGTERM)
    bench.wait(60)
    assert postmasters(folder) == []
    assert list(folder.parent.iterdir()) == [], "delete_on_stop removed the data folder, its log and its lock"
