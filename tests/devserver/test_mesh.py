"""A service counts as ready only when it holds its own port: another server answering there cannot pass for it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agentvault.common.services import identities, parse_service_secrets
from agentvault.devserver.mesh import SERVICES, Mesh


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def impostor() -> Iterator[int]:
    """Another program on the port, answering the readiness probe with 200 (e.g. a second mesh's edge)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_a_probe_answered_by_another_server_is_not_readiness(impostor: int, tmp_path: Path) -> None:
    edge = tuple(s for s in SERVICES if s.name == "edge")
    mesh = Mesh({"EDGE_PORT": str(impostor), "LOG_FORMAT": "text"}, log_dir=tmp_path / "logs", services=edge)
    try:
        with pytest.raises(RuntimeError, match="edge exited with code"):
            mesh.start(timeout=60)
    finally:
        mesh.stop()


def test_each_service_is_given_only_its_own_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever the caller's shell holds is not passed on as it is either.
    monkeypatch.setenv("SERVICE_CLIENT_SECRET", "from-the-shell-" + "x" * 32)
    mesh = Mesh({"AGENTVAULT_ADMIN_TOKEN": "admin-token-for-people", "LOG_FORMAT": "text"})
    given = parse_service_secrets(mesh.env["SERVICE_CLIENT_SECRETS"])
    assert set(given) == {s.name for s in identities()} == {"discovery", "health-monitor", "messaging"}
    assert len(set(given.values())) == len(given), "one secret per service"
    for spec in SERVICES:
        env = mesh.service_env(spec)
        if spec.authorization_server:
            assert parse_service_secrets(env["SERVICE_CLIENT_SECRETS"]) == given
            assert env["AGENTVAULT_ADMIN_TOKEN"] == "admin-token-for-people"
            assert "SERVICE_CLIENT_SECRET" not in env
            continue
        assert "AGENTVAULT_ADMIN_TOKEN" not in env, spec.name
        assert "SERVICE_CLIENT_SECRETS" not in env, spec.name
        if spec.name in given:
            assert env["SERVICE_CLIENT_SECRET"] == given[spec.name], spec.name
        else:
            assert "SERVICE_CLIENT_SECRET" not in env, spec.name
        others = {v for name, v in given.items() if name != spec.name}
        assert not others & set(env.values()), f"{spec.name} holds another service's secret"


def test_a_replica_started_from_a_copy_of_the_env_shares_the_identities() -> None:
    first = Mesh({"LOG_FORMAT": "text"})
    replica = Mesh(dict(first.env))
    assert replica.env["SERVICE_CLIENT_SECRETS"] == first.env["SERVICE_CLIENT_SECRETS"]
