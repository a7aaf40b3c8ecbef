"""`agentvault-dev run` as a user runs it: a subprocess, Ctrl-C, SIGTERM, a taken port, killed stores, a dead service.

After every run, each process seen in the dev server's tree while it ran must be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentvault.common.services import SERVICES, identities, parse_service_secrets
from agentvault.devserver.embedded import free_port

START_TIMEOUT = 120  # a fresh data folder runs initdb; the machine may be busy with other tests


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, start time, state) of a live process; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), fields[19], fields[0]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


class Tree(threading.Thread):
    """Records every descendant of `root` (pid, start time, command line) while it runs, by walking /proc."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[int, tuple[str, str]] = {}
        self._done = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> None:
        parents: dict[int, int] = {}
        starts: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (info := _stat(int(entry))) is not None:
                parents[int(entry)], starts[int(entry)] = info[0], info[1]
        found, frontier = set(), {self.root}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
            found |= frontier
        with self._lock:
            for pid in found:
                if pid not in self.seen:
                    self.seen[pid] = (starts[pid], _cmdline(pid))

    def run(self) -> None:
        while not self._done.wait(0.1):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def find(self, needle: str) -> list[int]:
        self.sample()
        with self._lock:
            return [pid for pid, (_, cmd) in self.seen.items() if needle in cmd and _alive(pid, self.seen[pid][0])]

    def left(self) -> list[str]:
        with self._lock:
            return [f"{pid} {cmd}" for pid, (start, cmd) in self.seen.items() if _alive(pid, start)]


def _alive(pid: int, start: str) -> bool:
    info = _stat(pid)
    return info is not None and info[1] == start and info[2] != "Z"


class DevServer:
    """One `python -m agentvault.devserver run` with its own data folder and free ports."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        # Every port the dev server listens on, each service's included (a default one, e.g. MESSAGING_PORT's 50054,
        # can be an ephemeral port another test's process holds at that moment).
        self.ports = {var: free_port() for var in [spec.port_var for spec in SERVICES] + ["AGENTVAULT_REDIS_PORT"]}
        base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "AGENTVAULT_ADMIN_TOKEN")}
        self.env = {
            **base,
            **{var: str(port) for var, port in self.ports.items()},
            "AGENTVAULT_DATA_DIR": str(data_dir),
            "STORE_CHECK_INTERVAL": "0.2",
            "LOG_LEVEL": "WARNING",
            **env,
        }
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.tree: Tree | None = None
        self._reader = threading.Thread()

    @property
    def edge(self) -> str:
        return f"http://127.0.0.1:{self.ports['EDGE_PORT']}"

    def start(self) -> DevServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agentvault.devserver", "run"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # A process group of its own, signalled as a whole, as a terminal's Ctrl-C signals its foreground group.
            start_new_session=True,
        )
        self.tree = Tree(self.process.pid)
        self.tree.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        assert self.process is not None
        until(lambda: any(text in line for line in self.lines), timeout, f"{text!r} in the output", self)

    def wait_running(self) -> None:
        self.wait_for("AgentVault Mesh is running", START_TIMEOUT)
        self.wait_for("Press Ctrl-C to stop.")

    def send(self, sig: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def finish(self, timeout: float = 60) -> int:
        """Waits for the dev server to exit; then nothing it started may be alive."""
        assert self.process is not None and self.tree is not None
        try:
            code = self.process.wait(timeout)
        finally:
            self.tree.stop()
        # The output is complete once the pipe closes (when the process and every holder of it are gone).
        self._reader.join(5)
        left = self.tree.left()
        assert not left, f"still running after the dev server exited: {left}\n{self.output}"
        return code

    def kill_everything(self) -> None:
        """Test cleanup only, after a failed assertion: nothing may outlive the test either."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        if self.tree is not None:
            for entry in self.tree.left():
                with contextlib.suppress(OSError):
                    os.kill(int(entry.split()[0]), signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def until(check: Callable[[], bool], timeout: float, what: str, dev: DevServer | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if dev is not None and dev.process is not None and dev.process.poll() is not None and what:
            raise AssertionError(f"dev server exited ({dev.process.returncode}) waiting for {what}:\n{dev.output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s" + (f":\n{dev.output}" if dev else ""))
        time.sleep(0.05)


def http(method: str, url: str, body: dict[str, Any] | None = None, token: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.fixture(scope="module")
def data_root() -> Iterator[Path]:
    # Not pytest's tmp tree: as root, PostgreSQL runs as its own user, which must reach the folder.
    root = Path(tempfile.mkdtemp(prefix="agentvault-devserver-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def run_dev() -> Iterator[Callable[..., DevServer]]:
    started: list[DevServer] = []

    def start(data_dir: Path, **env: str) -> DevServer:
        dev = DevServer(data_dir, **env).start()
        started.append(dev)
        return dev

    yield start
    for dev in started:
        dev.kill_everything()


def test_ctrl_c_during_first_start_then_after_a_fresh_and_a_reused_data_folder(
    data_root: Path, run_dev: Callable[..., DevServer]
) -> None:
    data = data_root / "shared"

    # Ctrl-C while initdb runs: everything stops, and no half-made cluster is left for the next start.
    dev = run_dev(data)
    assert dev.tree is not None
    until(lambda: bool(dev.tree and dev.tree.find("initdb")), 60, "initdb", dev)
    dev.send(signal.SIGINT)
    assert dev.finish() == 0, dev.output
    assert not (data / "postgres" / "PG_VERSION").exists()

    secrets_seen: list[dict[str, str]] = []
    for folder in ("fresh", "reused"):
        dev = run_dev(data)
        dev.wait_running()
        assert ("(generated" in dev.output) == (folder == "fresh"), dev.output
        secrets_seen.append(_service_secrets_given(dev, data))
        assert dev.tree is not None and dev.tree.find("postgres -D"), "an embedded PostgreSQL runs"
        assert http("GET", f"{dev.edge}/api/v1/health") == (200, {"status": "healthy", "agent_count": 0})
        status, ready = http("GET", f"{dev.edge}/readyz")
        assert status == 200 and ready["status"] == "ready", ready
        # The console is printed with the other URLs, and a person can sign in to it (Redis and a key are given).
        assert f"console            {dev.edge}/console" in dev.output, dev.output
        token = (data / "admin_token").read_text().strip()
        status, session = http("POST", f"{dev.edge}/console/api/session", {"credential": token})
        assert status == 200 and session["role"] == "admin", session
        dev.send(signal.SIGINT)
        assert dev.finish() == 0, dev.output
        assert refused(dev.ports["EDGE_PORT"]) and refused(dev.ports["AGENTVAULT_REDIS_PORT"])
    # Made once in the data folder, then reused: the registry and the services agree across restarts.
    assert secrets_seen[0] == secrets_seen[1]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def _service_secrets_given(dev: DevServer, data: Path) -> dict[str, str]:
    """Each service's secret is kept in the data folder (0600) and given to that service and the registry only;
    the bootstrap admin token to the registry only. Returns the secrets."""
    assert dev.tree is not None
    files = {spec.name: data / f"service_secret_{spec.name}" for spec in identities()}
    secrets = {name: path.read_text().strip() for name, path in files.items()}
    for name, path in files.items():
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert len(secrets[name]) >= 32, name
    admin_token = (data / "admin_token").read_text().strip()
    for spec in SERVICES:
        [pid] = dev.tree.find(f"-m {spec.module}")
        env = _environ(pid)
        values = "\n".join(env.values())
        if spec.authorization_server:
            assert parse_service_secrets(env["SERVICE_CLIENT_SECRETS"]) == secrets
            assert env["AGENTVAULT_ADMIN_TOKEN"] == admin_token
            continue
        assert admin_token not in values, f"{spec.name} was given the bootstrap admin token"
        assert "SERVICE_CLIENT_SECRETS" not in env, spec.name
        for name, secret in secrets.items():
            if name == spec.name:
                assert env["SERVICE_CLIENT_SECRET"] == secret, spec.name
            else:
                assert secret not in values, f"{spec.name} was given the secret of {name}"
    return secrets


def test_a_taken_port_is_named_and_nothing_starts(data_root: Path, run_dev: Callable[..., DevServer]) -> None:
    data = data_root / "taken"
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = free_port()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        dev = run_dev(data, EDGE_PORT=str(port))
        code = dev.finish(30)
    assert code == 2
    assert dev.lines == [f"agentvault-dev: port {port} (EDGE_PORT) is in use"], dev.output
    assert not (data / "postgres").exists() and not (data / "redis").exists(), "nothing was started"


def test_killed_stores_are_restarted_and_a_hung_one_reads_not_ready(
    data_root: Path, run_dev: Callable[..., DevServer]
) -> None:
    dev = run_dev(data_root / "shared")
    dev.wait_running()
    assert dev.tree is not None and dev.process is not None
    token = (data_root / "shared" / "admin_token").read_text().strip()

    def write(name: str) -> tuple[int, Any]:
        return http("POST", f"{dev.edge}/api/v1/api-keys", {"name": name}, token)

    def ready() -> int:
        return http("GET", f"{dev.edge}/readyz")[0]

    def reason(body: Any) -> str:
        return str(body["error"]["details"][0]["reason"])

    assert write("before")[0] == 200

    # Redis hangs (stopped, not dead): its pings time out, every service reads not ready, then ready again.
    [redis] = dev.tree.find("redis-server")
    os.kill(redis, signal.SIGSTOP)
    try:
        until(lambda: ready() == 503, 20, "/readyz 503 while Redis hangs", dev)
    finally:
        os.kill(redis, signal.SIGCONT)
    until(lambda: ready() == 200, 20, "/readyz 200 once Redis answers", dev)

    # Each store dies while the dev server is frozen (so the outage lasts while a client looks), then the
    # thawed watchdog restarts it and the mesh recovers.
    for store, needle in (("Redis", "redis-server"), ("PostgreSQL", "postgres -D")):
        [pid] = dev.tree.find(needle)
        os.kill(dev.process.pid, signal.SIGSTOP)
        try:
            os.kill(pid, signal.SIGKILL)
            until(lambda: ready() == 503, 20, f"/readyz 503 while {store} is dead", dev)
            status, body = http("GET", f"{dev.edge}/api/v1/health")
            assert status == 503 and reason(body).endswith("_UNAVAILABLE"), body
            if store == "PostgreSQL":
                status, body = write("during")
                assert (status, reason(body)) == (503, "STORE_UNAVAILABLE"), body
        finally:
            os.kill(dev.process.pid, signal.SIGCONT)
        dev.wait_for(f"{store} restarted")
        assert f"agentvault-dev: {store} exited (code -9); restarting it" in dev.lines, dev.output
        until(lambda: ready() == 200, 20, f"/readyz 200 after the {store} restart", dev)
        until(lambda: http("GET", f"{dev.edge}/api/v1/health")[0] == 200, 20, "/api/v1/health 200", dev)
    until(lambda: write("after")[0] == 200, 20, "a successful write after the restarts", dev)

    dev.send(signal.SIGTERM)
    assert dev.finish() == 0, dev.output


def test_a_service_that_dies_stops_the_mesh(data_root: Path, run_dev: Callable[..., DevServer]) -> None:
    dev = run_dev(data_root / "shared")
    dev.wait_running()
    assert dev.tree is not None
    [registry] = dev.tree.find("-m agentvault_registry")
    os.kill(registry, signal.SIGKILL)
    assert dev.finish() == 1, dev.output
    assert "agentvault-dev: registry exited with code -9; stopping the mesh" in dev.lines, dev.output


def test_a_dev_server_killed_outright_takes_everything_it_started_along(
    data_root: Path, run_dev: Callable[..., DevServer]
) -> None:
    """SIGKILL of the runner alone (no chance to stop anything in order): every process it started ends by itself
    (the kernel signals each when its parent dies), PostgreSQL and Redis included."""
    dev = run_dev(data_root / "shared")
    dev.wait_running()
    assert dev.tree is not None and dev.process is not None
    dev.tree.sample()
    started = dev.tree.left()
    for name in ("postgres", "redis-server", "agentvault_registry", "agentvault_messaging", "agentvault_edge"):
        assert any(name in line for line in started), (name, started)
    dev.process.kill()  # the runner only, not its process group: what Ctrl-C reaches is not involved
    dev.process.wait(10)
    tree = dev.tree
    tree.stop()
    until(lambda: not tree.left(), 60, "every process the killed dev server started to end")
