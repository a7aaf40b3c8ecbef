"""Starts the mesh's services as separate OS processes, waits until each serves, and stops them cleanly."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentvault.common.services import (
    GRPC,
    SECRET_VAR,
    SECRETS_VAR,
    SERVICES,
    ServiceSpec,
    format_service_secrets,
    identities,
    parse_service_secrets,
)
from agentvault.devserver.credentials import new_service_secret
from agentvault.devserver.embedded import Interrupted, free_port, listens_on, terminate
from agentvault.devserver.processes import dies_with_parent

__all__ = ["SERVICES", "Mesh", "ServiceSpec", "grpc_serving", "http_ok"]

ADMIN_TOKEN_VAR = "AGENTVAULT_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        # HTTPException: something that is not HTTP/1 answered (another service on the port).
        return False


def _never() -> bool:
    return False


@dataclass
class Mesh:
    """One mesh: a set of service processes sharing an environment (ports, DATABASE_URL, REDIS_URL, ...).

    Each service runs in a session of its own, so a Ctrl-C on the terminal reaches only the runner, which stops
    them in order. A service is ready when it is alive, holds its port itself and answers its health check:
    another program on the same port cannot pass for it.
    """

    env: dict[str, str]
    log_dir: Path | None = None
    services: tuple[ServiceSpec, ...] = SERVICES
    host: str = "127.0.0.1"
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)
    # Polled while waiting for a service; true aborts start() with Interrupted (the dev server's Ctrl-C).
    interrupted: Callable[[], bool] = _never

    def __post_init__(self) -> None:
        for spec in self.services:
            if not self.env.get(spec.port_var):
                self.env[spec.port_var] = str(free_port())
        if not self.env.get(SECRETS_VAR):
            # Kept in env, so a replica started from a copy of it (tests, benches) joins with the same identities.
            self.env[SECRETS_VAR] = format_service_secrets({s.name: new_service_secret() for s in identities()})

    def service_env(self, spec: ServiceSpec) -> dict[str, str]:
        """The environment of one service: each gets only its own secret. The registry, as the authorization
        server, gets every service's secret and the bootstrap admin token (for people); a service with an identity
        gets its own SERVICE_CLIENT_SECRET; none gets another's."""
        env = {**os.environ, **self.env}
        own = parse_service_secrets(env.pop(SECRETS_VAR, ""))
        env.pop(SECRET_VAR, None)
        admin_token = env.pop(ADMIN_TOKEN_VAR, None)
        if spec.authorization_server:
            env[SECRETS_VAR] = format_service_secrets(own)
            if admin_token:
                env[ADMIN_TOKEN_VAR] = admin_token
        elif spec.name in own:
            env[SECRET_VAR] = own[spec.name]
        return env

    def port(self, name: str) -> int:
        return int(self.env[self.spec(name).port_var])

    def address(self, name: str) -> str:
        return f"{self.host}:{self.port(name)}"

    def url(self, path: str = "") -> str:
        return f"http://{self.host}:{self.port('edge')}{path}"

    def spec(self, name: str) -> ServiceSpec:
        return next(s for s in self.services if s.name == name)

    def start(self, timeout: float = 60) -> None:
        for spec in self.services:
            self.start_service(spec.name, timeout)

    def start_service(self, name: str, timeout: float = 60) -> None:
        spec = self.spec(name)
        env = self.service_env(spec)
        stdout: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stdout = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_service
            self._logs[name] = stdout
        process = subprocess.Popen(
            # And a runner killed outright takes them along (dies_with_parent).
            [*dies_with_parent(), sys.executable, "-m", spec.module],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout else None,
            start_new_session=True,  # Ctrl-C reaches the runner, which stops children in order
        )
        self.processes[name] = process
        self._wait_ready(spec, process, timeout)

    def _wait_ready(self, spec: ServiceSpec, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        address = self.address(spec.name)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with code {process.returncode} during start{self._tail(spec)}")
            if self.interrupted():
                raise Interrupted(f"stopped while {spec.name} was starting")
            if listens_on(process.pid, self.port(spec.name)) is False:
                time.sleep(0.05)
                continue
            ready = grpc_serving(address) if spec.kind == GRPC else http_ok(f"http://{address}/healthz")
            if ready:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{spec.name} not ready on {address} after {timeout}s{self._tail(spec)}")

    def _tail(self, spec: ServiceSpec) -> str:
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{spec.name}.log"
        if not path.exists():
            return ""
        return "\n--- last log lines ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:])

    def stop_service(
        self, name: str, timeout: float = 15, sig: int = signal.SIGTERM, hurry: Callable[[], bool] = _never
    ) -> int | None:
        process = self.processes.pop(name, None)
        code = None
        if process is not None:
            code = terminate(process, sig, timeout, hurry)
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()
        return code

    def stop(self, hurry: Callable[[], bool] = _never) -> None:
        for spec in reversed(self.services):
            with contextlib.suppress(Exception):
                self.stop_service(spec.name, hurry=hurry)
