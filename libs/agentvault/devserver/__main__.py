"""`agentvault-dev run`: the whole mesh on this machine, with embedded PostgreSQL and Redis unless
DATABASE_URL / REDIS_URL point elsewhere. Ctrl-C stops everything; data stays in AGENTVAULT_DATA_DIR.

How it behaves:
- Every port it will use (each service's port variable, AGENTVAULT_REDIS_PORT for the embedded Redis;
  PostgreSQL listens on a Unix socket only) is checked before anything starts; a taken one is named in one
  line with its variable, and nothing is started.
- Every process it starts runs in a session of its own (a Ctrl-C on the terminal reaches only this runner),
  is tracked from the moment it exists, and counts as ready only when it is alive and holds its own port.
- Ctrl-C or SIGTERM, a service that exits, or any error (during start-up too) stops every process it
  started, services first, then Redis, then PostgreSQL; a second Ctrl-C stops them without waiting.
  It is also the subreaper of its process tree, so nothing a child leaves behind outlives it.
- A watchdog restarts an embedded PostgreSQL or Redis that dies (services reconnect; their readiness is
  NOT_SERVING meanwhile). One that dies more than RESTART_LIMIT times in RESTART_WINDOW seconds, or cannot be
  restarted, stops the mesh with a message.

Exit codes: 0 stopped on request; 1 a process failed (at start-up or while running); 2 nothing was started
(a malformed setting, a port in use, the data folder in use by another run).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from agentvault.common.services import SECRETS_VAR, format_service_secrets, parse_service_secrets
from agentvault.common.settings import Env, SettingsError
from agentvault.devserver.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    Interrupted,
    InUse,
    ensure_admin_token,
    ensure_encryption_key,
    ensure_service_secrets,
    free_port,
    port_in_use,
)
from agentvault.devserver.mesh import SERVICES, Mesh

EXIT_STOPPED = 0
EXIT_FAILED = 1
EXIT_NOT_STARTED = 2

REDIS_PORT_VAR = "AGENTVAULT_REDIS_PORT"
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
WATCH_INTERVAL = 0.2


def say(message: str) -> None:
    print(f"agentvault-dev: {message}", file=sys.stderr, flush=True)


@dataclass
class Requests:
    """What the signal handlers asked for; checked by every wait, so start-up aborts promptly."""

    signal_name: str = ""
    count: int = 0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signal_name = signal.Signals(signum).name
        if self.count == 2:
            # os.write, not print: a handler printing while the main code prints raises a reentrancy error.
            os.write(2, b"agentvault-dev: stopping without waiting\n")

    def stop(self) -> bool:
        return self.count > 0

    def hurry(self) -> bool:
        return self.count > 1


@dataclass
class Plan:
    data_dir: Path
    bind_host: str
    ports: dict[str, int]  # variable -> port, every one this run will listen on
    database_url: str | None
    redis_url: str | None

    @classmethod
    def load(cls, env: Env) -> Plan:
        ports = {spec.port_var: env.port(spec.port_var) for spec in SERVICES}
        redis_url = env.optional("REDIS_URL")
        if redis_url is None:
            ports[REDIS_PORT_VAR] = env.port(REDIS_PORT_VAR)
        for var, port in ports.items():
            if port == 0:  # "any free port"
                ports[var] = free_port()
        return cls(
            data_dir=Path(env.str("AGENTVAULT_DATA_DIR", "./.data")).resolve(),
            bind_host=env.str("AGENTVAULT_BIND_HOST", "127.0.0.1"),
            ports=ports,
            database_url=env.optional("DATABASE_URL"),
            redis_url=redis_url,
        )

    def port_problem(self) -> str | None:
        """One line naming the first port that cannot be used, or None."""
        seen: dict[int, str] = {}
        for var, port in self.ports.items():
            if port in seen:
                return f"port {port} is given to both {seen[port]} and {var}"
            seen[port] = var
        for var, port in self.ports.items():
            host = "127.0.0.1" if var == REDIS_PORT_VAR else self.bind_host
            if port_in_use(host, port):
                return f"port {port} ({var}) is in use"
        return None


@dataclass
class Store:
    """An embedded server the watchdog keeps alive."""

    name: str
    server: EmbeddedPostgres | EmbeddedRedis
    deaths: deque[float] = field(default_factory=deque)


def become_subreaper() -> None:
    """Orphans in our process tree (e.g. backends of a killed postmaster) are reparented to us, not to init, so
    the final sweep can find and end them. Linux only; elsewhere the ordered stop is all there is."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        pr_set_child_subreaper = 36
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _children_of(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if int(stat.rpartition(")")[2].split()[1]) == pid:
                        found.append(int(entry))
    return found


def reap_orphans(tracked: set[int]) -> None:
    """Collects the exit status of orphans reparented to us (never of the processes Popen tracks)."""
    for pid in _children_of(os.getpid()):
        if pid not in tracked:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def sweep_orphans(timeout: float = 5.0) -> None:
    """After the ordered stop: ends whatever is still our child (reparented orphans), SIGTERM then SIGKILL."""
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while True:
        left = []
        for pid in _children_of(os.getpid()):
            with contextlib.suppress(ChildProcessError, OSError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    left.append(pid)
        if not left:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        time.sleep(0.05)


def watch(mesh: Mesh, stores: list[Store], requests: Requests) -> int:
    """Runs until asked to stop (0) or a service dies or a store cannot be kept alive (1)."""
    tracked = {p.pid for p in mesh.processes.values()}
    while not requests.stop():
        for name, process in mesh.processes.items():
            if process.poll() is not None:
                say(f"{name} exited with code {process.returncode}; stopping the mesh")
                return EXIT_FAILED
        for store in stores:
            if store.server.alive():
                continue
            dead = store.server.process
            code = dead.returncode if dead is not None else None
            now = time.monotonic()
            store.deaths.append(now)
            while store.deaths and store.deaths[0] < now - RESTART_WINDOW:
                store.deaths.popleft()
            if len(store.deaths) > RESTART_LIMIT:
                say(f"{store.name} exited (code {code}) {len(store.deaths)} times in {RESTART_WINDOW:.0f}s; "
                    "stopping the mesh")  # fmt: skip
                return EXIT_FAILED
            say(f"{store.name} exited (code {code}); restarting it")
            try:
                store.server.restart(requests.stop)
            except Interrupted:
                return EXIT_STOPPED
            except Exception as exc:
                say(f"cannot restart {store.name}: {exc}; stopping the mesh")
                return EXIT_FAILED
            say(f"{store.name} restarted (pid {store.server.pid})")
        reap_orphans(tracked | {s.server.pid for s in stores if s.server.pid})
        time.sleep(WATCH_INTERVAL)
    return EXIT_STOPPED


def run() -> int:
    env = Env()
    try:
        plan = Plan.load(env)
        # Secrets given in the environment win over the data folder's (checked before anything starts).
        given_secrets = parse_service_secrets(env.str(SECRETS_VAR, ""))
    except SettingsError as exc:
        say(str(exc))
        return EXIT_NOT_STARTED
    problem = plan.port_problem()
    if problem is not None:
        say(problem)
        return EXIT_NOT_STARTED

    requests = Requests()
    signal.signal(signal.SIGINT, requests.handle)
    signal.signal(signal.SIGTERM, requests.handle)
    become_subreaper()

    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    mesh: Mesh | None = None
    code = EXIT_FAILED
    try:
        database_url = plan.database_url
        if database_url is None:
            postgres = EmbeddedPostgres(plan.data_dir / "postgres")
            database_url = postgres.start(requests.stop)
        redis_url = plan.redis_url
        if redis_url is None:
            redis = EmbeddedRedis(plan.data_dir / "redis", port=plan.ports[REDIS_PORT_VAR])
            redis_url = redis.start(requests.stop)
        admin_token = env.optional("AGENTVAULT_ADMIN_TOKEN")
        generated = False
        if admin_token is None:
            admin_token, generated = ensure_admin_token(plan.data_dir)
        service_env = {
            **{spec.port_var: str(plan.ports[spec.port_var]) for spec in SERVICES},
            "AGENTVAULT_DATA_DIR": str(plan.data_dir),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "AGENTVAULT_ADMIN_TOKEN": admin_token,
            # Every service's own secret, from the data folder; the mesh gives each service only its own.
            SECRETS_VAR: format_service_secrets({**ensure_service_secrets(plan.data_dir), **given_secrets}),
            "FEDERATION_ENCRYPTION_KEYS": env.optional("FEDERATION_ENCRYPTION_KEYS")
            or ensure_encryption_key(plan.data_dir),
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "text"),
        }
        mesh = Mesh(service_env, log_dir=None, interrupted=requests.stop)
        mesh.start()
        edge = f"http://127.0.0.1:{mesh.port('edge')}"
        print("\nAgentVault Mesh is running:", flush=True)
        print(f"  edge (HTTP/JSON)   {edge}/api/v1/health")
        print(f"  OpenAPI            {edge}/api/v1/openapi.json")
        print(f"  console            {edge}/console  (sign in with the admin token below)")
        for spec in SERVICES:
            if spec.kind == "grpc":
                print(f"  {spec.name:<18} grpc://{mesh.address(spec.name)}")
        print(f"  PostgreSQL         {f'embedded, {postgres.data_dir}' if postgres else 'DATABASE_URL'}")
        print(f"  Redis              {f'embedded, {redis_url}' if redis else 'REDIS_URL'}")
        where = (
            f"(generated, kept in {plan.data_dir / 'admin_token'})" if generated else "(from the data folder or env)"
        )
        print(f"  admin token        {admin_token} {where}")
        print("Press Ctrl-C to stop.\n", flush=True)
        stores = [Store("PostgreSQL", postgres)] if postgres else []
        if redis:
            stores.append(Store("Redis", redis))
        code = watch(mesh, stores, requests)
    except Interrupted:
        code = EXIT_STOPPED
    except InUse as exc:
        say(f"{exc} (another agentvault-dev run?)")
        code = EXIT_NOT_STARTED
    except Exception as exc:
        say(str(exc))
        code = EXIT_FAILED
    finally:
        if requests.stop() and code == EXIT_STOPPED:
            print(f"\n{requests.signal_name}: stopping...", flush=True)
        else:
            print("\nStopping...", flush=True)
        # Each step runs whatever the one before raised: a failed stop must not keep the others running.
        steps = [
            *([mesh.stop] if mesh else []),
            *([redis.stop] if redis else []),
            *([postgres.stop] if postgres else []),
        ]
        for stop in steps:
            try:
                stop(requests.hurry)
            except Exception as exc:
                say(f"while stopping: {exc}")
                code = EXIT_FAILED
        sweep_orphans()
        print(f"Stopped; data kept in {plan.data_dir}", flush=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="agentvault-dev", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["run"], help="run: start the whole mesh in the foreground")
    parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.exit(run())


if __name__ == "__main__":
    main()
