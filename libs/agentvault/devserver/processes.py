"""Ports and child processes for the dev server: free ports, who listens where, waiting for and ending a process."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    """Start-up was asked to stop (Ctrl-C, SIGTERM) while waiting for a process."""


class InUse(RuntimeError):
    """The data folder belongs to another running process."""


def never() -> bool:
    return False


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and never one this process handed out before: the kernel may offer a
    just-released port again, and two services of one mesh must not be given the same one."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` would fail because something holds it (a listener, not TIME_WAIT leftovers:
    SO_REUSEADDR lets those pass, as it does for the servers themselves)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _listening_inodes(port: int) -> set[int]:
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the socket's inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` itself holds the listening socket on `port` (so a readiness probe answered there is
    its answer, not another program's); None where /proc cannot tell (not Linux)."""
    if not Path("/proc/net/tcp").exists():
        return None
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                return True
    return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    interrupted: Callable[[], bool] = never,
) -> None:
    """Waits until `host:port` accepts connections; with `process`, until that very process listens there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if interrupted():
            raise Interrupted(f"stopped while waiting for port {port}")
        if process is not None:
            if process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
            if listens_on(process.pid, port) is False:
                time.sleep(0.05)
                continue
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def dies_with_parent(sig: str = "TERM") -> list[str]:
    """A command prefix that makes the child receive SIG`sig` when this process dies, however it dies: Ctrl-C stops
    the children in order, but a runner killed with SIGKILL (or the OOM killer) would leave its mesh, PostgreSQL and
    Redis running, holding ports and data folders. util-linux's `setpriv --pdeathsig` sets Linux's parent-death
    signal and execs the command (a `preexec_fn` doing the same can deadlock in a process with threads). Empty
    where there is no setpriv, and outside the main thread: the signal follows the thread that started the child,
    and a worker thread that ends would take the child with it."""
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = _setpriv()
    return [setpriv, "--pdeathsig", sig, "--"] if setpriv else []


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv") if sys.platform.startswith("linux") else None


def terminate(
    process: subprocess.Popen[bytes],
    sig: int = signal.SIGTERM,
    timeout: float = 15,
    hurry: Callable[[], bool] = never,
    then: int = signal.SIGKILL,
) -> int:
    """Sends `sig`, waits up to `timeout` (less if `hurry()` turns true), then `then` to the process group
    (every child here leads its own session, so its group is its own); returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline and not hurry():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.05)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, then)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(then)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return int(process.returncode)


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a dead process its parent has not collected yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        if text:
            return "\n--- " + str(path) + " ---\n" + "\n".join(text)
    return ""


class ChildServer:
    """A server process this process started and owns: its pid from the moment it exists, and whether it runs."""

    _process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None
