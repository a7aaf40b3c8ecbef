"""A service counts as ready only when it holds its own port: another server answering there cannot pass for it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

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
