"""Processes: the event loop the services use, SIGTERM, CPU pinning, CPU time per process, the machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import time
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs `main` on uvloop when it is installed, as every service does."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent only on Windows
        asyncio.run(main)
        return
    uvloop.run(main)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process (PostgreSQL, Redis and the services
    run in sessions of their own: nothing but this process's own cleanup stops them) and remove temporary folders."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Processes started inside inherit this CPU set (affinity is inherited across fork and exec)."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads); 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Direct children of `pid` (PostgreSQL backends are children of the postmaster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class CpuMeter:
    """CPU used by named groups of processes over a window, as a percentage of one core."""

    groups: dict[str, list[int]]
    expand: dict[str, int]  # group name -> parent pid whose children join the group at each sample

    def _sample(self) -> tuple[float, dict[str, dict[int, float]]]:
        per_group: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            members = set(pids)
            if name in self.expand:
                members.update(children(self.expand[name]))
            per_group[name] = {pid: cpu_seconds(pid) for pid in members}
        return machine_busy_seconds(), per_group

    @contextlib.contextmanager
    def window(self, into: dict[str, float]) -> Iterator[None]:
        t0, (busy0, before) = time.perf_counter(), self._sample()
        yield
        t1, (busy1, after) = time.perf_counter(), self._sample()
        elapsed = max(t1 - t0, 1e-9)
        ours = 0.0
        for name in self.groups:
            # Processes that exited during the window are left out; new ones count from zero.
            used = sum(max(0.0, now - before[name].get(pid, 0.0)) for pid, now in after[name].items() if now)
            into[name] = round(100 * used / elapsed, 1)
            ours += used
        # Everything else the machine did meanwhile: other people's processes make a figure unreliable.
        into["other"] = round(max(0.0, 100 * (busy1 - busy0 - ours) / elapsed), 1)


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait), from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
    return 0.0


def postmaster_pid(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return None


def _versions(names: Iterable[str]) -> dict[str, str]:
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "packages": _versions(["grpcio", "protobuf", "asyncpg", "aiohttp", "uvloop", "pgserver"]),
    }
