"""A real PostgreSQL from the pgserver wheel's binaries, in a data folder, as a child process of this one."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agentvault.devserver.processes import (
    ChildServer,
    Interrupted,
    InUse,
    dies_with_parent,
    log_tail,
    never,
    pid_alive,
    terminate,
)

log = logging.getLogger(__name__)


# Running as root, PostgreSQL needs another user; this is the one pgserver uses, so old data folders still work.
_PG_SYSTEM_USER = "pgserver"


def _pg_bin() -> Path:
    # Located without importing pgserver: its import touches a lock under XDG_RUNTIME_DIR and warns.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("no embedded PostgreSQL: install the 'embedded' extra (pgserver)")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _world_traversable(path: Path) -> None:
    """Lets another user reach `path`: every parent directory gets o+rx (what pgserver does as root)."""
    rx = 0o055
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & rx != rx:
            parent.chmod(mode | rx)


def _world_readable_tree(root: Path) -> None:
    for dirpath, _dirs, names in os.walk(root):
        Path(dirpath).chmod(Path(dirpath).stat().st_mode | 0o055)
        for name in names:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o044 | (0o011 if path.stat().st_mode & 0o100 else 0))


class EmbeddedPostgres(ChildServer):
    """PostgreSQL 16 from the pgserver wheel, listening on a Unix socket only (so it never takes a port).

    The postmaster is started directly (no pg_ctl) as a child of this process in a session of its own: this
    process knows its pid from the moment it exists, a Ctrl-C on the terminal cannot reach it or interrupt its
    start, and stop() ends exactly that process. max_connections is passed on its command line, so no restart
    is ever needed (a restart through pg_ctl replaced the postmaster behind pgserver's back, and pgserver's
    cleanup then skipped the new one: the PostgreSQL every fresh data folder leaked).
    """

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False, max_connections: int = 200) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.delete_on_stop = delete_on_stop
        self.max_connections = max_connections
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.lock_path = self.data_dir.parent / f"{self.data_dir.name}.lock"
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        self._lock_file: int | None = None
        self._user = _PG_SYSTEM_USER if os.geteuid() == 0 else None

    def start(self, interrupted: Callable[[], bool] = never, timeout: float = 120) -> str:
        """Initializes the cluster if the folder has none, starts the server, waits until it accepts
        connections; returns the URI of the `postgres` database. On any failure nothing is left running."""
        try:
            self._lock()
            self._stop_leftover()
            self._init_cluster(interrupted, timeout)
            self._launch(interrupted, timeout)
        except BaseException:
            self.stop()
            raise
        return self.uri()

    def restart(self, interrupted: Callable[[], bool] = never, timeout: float = 60) -> None:
        """Starts the server again after it died (the watchdog's remedy); a live one is left alone."""
        if self.alive():
            return
        self._process = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._launch(interrupted, max(1.0, deadline - time.monotonic()))
                return
            except RuntimeError as exc:
                # After a SIGKILL, orphaned backends hold the old shared memory for a moment.
                if isinstance(exc, Interrupted) or time.monotonic() > deadline:
                    raise
                log.info("PostgreSQL did not start yet (%s); retrying", str(exc).splitlines()[0])
                time.sleep(0.2)

    def uri(self, database: str = "postgres") -> str:
        assert self._socket_dir is not None, "start() first"
        return f"postgresql://postgres:@/{database}?host={self._socket_dir}"

    def stop(self, hurry: Callable[[], bool] = never) -> None:
        """Fast shutdown (clients disconnected, data checkpointed); immediate shutdown, then SIGKILL, if slow."""
        try:
            if self._process is not None:
                # SIGINT is PostgreSQL's fast shutdown; SIGQUIT its immediate one, which also ends every backend.
                code = terminate(self._process, signal.SIGINT, 30, hurry, then=signal.SIGQUIT)
                log.debug("PostgreSQL exited with %s", code)
                self._process = None
            if self.delete_on_stop:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.log_path.unlink(missing_ok=True)
                if self._lock_file is not None:  # still ours: nobody can be waiting for this folder
                    self.lock_path.unlink(missing_ok=True)
            if self._socket_dir is not None and self._socket_dir != self.data_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
        finally:
            self._unlock()

    # -------------------------------------------------------------------------------------- internals

    def _lock(self) -> None:
        """One owner per data folder: a second one would stop or reuse the first one's server."""
        if self._lock_file is not None:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InUse(f"the PostgreSQL data folder {self.data_dir} is in use by another process") from None
        self._lock_file = fd

    def _unlock(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    def _stop_leftover(self) -> None:
        """A postmaster still running on this folder while nobody holds its lock was left by a run that died
        (or by an older version of this code): stop it, or our server could not start."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not cmdline or not cmdline[0].endswith(b"postgres") or str(self.data_dir).encode() not in cmdline:
                return
            log.warning("stopping PostgreSQL pid %d left running on %s by an earlier run", pid, self.data_dir)
            for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not pid_alive(pid):
                    return

    def _chown(self, path: Path) -> None:
        if self._user:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _prepare_user(self) -> None:
        if not self._user:
            return
        import pwd

        try:
            pwd.getpwnam(self._user)
        except KeyError:
            subprocess.run(["useradd", "-s", "/bin/false", self._user], check=True, capture_output=True)
        bin_dir = _pg_bin()
        _world_traversable(self.data_dir)
        _world_traversable(bin_dir)
        if not (bin_dir / "postgres").stat().st_mode & 0o001:
            _world_readable_tree(bin_dir.parent)

    def _init_cluster(self, interrupted: Callable[[], bool], timeout: float) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise RuntimeError(f"{self.data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION)")
        self._prepare_user()
        # initdb writes next to the folder and the result is renamed into place: an interrupted initdb leaves
        # nothing a later start would mistake for a cluster.
        staging = self.data_dir.parent / f"{self.data_dir.name}.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        self._chown(staging)
        args = [str(_pg_bin() / "initdb"), "-D", str(staging), "--auth=trust", "--auth-local=trust",
                "--encoding=utf8", "-U", "postgres"]  # fmt: skip
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                dies_with_parent() + args,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self._user,
            )
            try:
                deadline = time.monotonic() + timeout
                while process.poll() is None:
                    if interrupted():
                        raise Interrupted("stopped during initdb")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"initdb did not finish in {timeout}s")
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(0.1)
                if process.returncode != 0:
                    output.seek(0)
                    text = output.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"initdb failed with code {process.returncode}:\n{text}")
            except BaseException:
                terminate(process, signal.SIGTERM, 5)
                shutil.rmtree(staging, ignore_errors=True)
                raise
        if self.data_dir.exists():
            self.data_dir.rmdir()
        staging.rename(self.data_dir)

    def _choose_socket_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes; a deep data folder gets a short directory in /tmp.
        if len(str(self.data_dir / ".s.PGSQL.5432")) < 100:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"agentvault-pg-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        self._chown(path)
        return path

    def _launch(self, interrupted: Callable[[], bool], timeout: float) -> None:
        self._prepare_user()
        self._socket_dir = self._choose_socket_dir()
        args = [
            str(_pg_bin() / "postgres"),
            "-D", str(self.data_dir),
            "-h", "",  # no TCP at all
            "-k", str(self._socket_dir),
            # Every service keeps a pool, and a test session runs many meshes: 100 connections is too few.
            "-c", f"max_connections={int(self.max_connections)}",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                # Orphaned, a fast shutdown (SIGINT): the services' connections are going too.
                dies_with_parent("INT") + args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self._user,
            )
        self._wait_ready(self._process, interrupted, timeout)

    def _wait_ready(self, process: subprocess.Popen[bytes], interrupted: Callable[[], bool], timeout: float) -> None:
        """Ready when postmaster.pid names this very process and says `ready` (what pg_ctl -w waits for)."""
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"PostgreSQL exited with code {process.returncode} while starting{log_tail(self.log_path)}"
                )
            with contextlib.suppress(OSError, ValueError):
                lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
                if len(lines) >= 8 and int(lines[0]) == process.pid and lines[7].strip() == "ready":
                    return
            if interrupted():
                raise Interrupted("stopped while PostgreSQL was starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL not ready after {timeout}s{log_tail(self.log_path)}")
            time.sleep(0.05)
