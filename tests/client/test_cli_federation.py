"""The `agentvault` federation and discovery commands against real meshes: peers, credentials, federated search."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from tests.client.conftest import Cli
from tests.client.test_cli import assert_clean_failure, ok
from tests.conftest import MeshHandle, unique_did


def member_token(cli: Cli) -> str:
    return str(ok(cli("keys", "create", f"member-{secrets.token_hex(3)}"))["token"])


def test_peers_create_list_get_update_delete(cli: Cli) -> None:
    url = f"https://peer-{secrets.token_hex(4)}.example"
    created = ok(cli("federation", "peers", "create", "--name", "Partner", "--registry-url", url,
                     "--api-key", "avf_0123456789abcdef_secret", "--protocol", "grpc",
                     "--grpc-endpoint", "peer.example:50051", "--require-mtls",
                     "--metadata", "team=search"))  # fmt: skip
    peer_id = created["id"]
    assert (created["name"], created["registry_url"], created["protocol"]) == ("Partner", url, "grpc")
    assert created["grpc_endpoint"] == "peer.example:50051"
    assert created["require_mtls"] is True
    assert created["is_active"] is True, "active by default"
    assert created["metadata"] == {"team": "search"}
    assert created["api_key"] == "", "the key is never returned"
    assert "avf_0123456789abcdef_secret" not in json.dumps(created)

    assert ok(cli("federation", "peers", "get", peer_id)) == created
    listed = ok(cli("federation", "peers", "list"))
    assert peer_id in [p["id"] for p in listed["peers"]]
    table = cli("-o", "table", "federation", "peers", "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "REGISTRY_URL"]
    assert any(line.startswith(peer_id) and url in line for line in table.stdout.splitlines())

    # Only the flags given change.
    updated = ok(cli("federation", "peers", "update", peer_id, "--no-active", "--name", "Partner 2"))
    assert (updated["is_active"], updated["name"]) == (False, "Partner 2")
    assert (updated["registry_url"], updated["protocol"], updated["require_mtls"]) == (url, "grpc", True)
    auto = ok(cli("federation", "peers", "update", peer_id, "--protocol", "auto"))
    assert auto["protocol"] == "unspecified"

    assert ok(cli("federation", "peers", "delete", peer_id)) == {}
    stderr = assert_clean_failure(cli("federation", "peers", "get", peer_id), 1)
    assert "NOT_FOUND" in stderr
    assert peer_id not in [p["id"] for p in ok(cli("federation", "peers", "list"))["peers"]]


def test_invalid_peer_names_each_field_once(cli: Cli) -> None:
    result = cli("federation", "peers", "create", "--name", "Bad", "--registry-url", "ftp://x.example",
                 "--api-key", "k", "--grpc-endpoint", "no port")  # fmt: skip
    stderr = assert_clean_failure(result, 2)
    first, *rest = stderr.splitlines()
    assert first == "agentvault: INVALID_ARGUMENT: 2 invalid fields"
    assert [line.split(":")[0] for line in rest] == ["  peer.registry_url", "  peer.grpc_endpoint"]
    assert stderr.count("peer.registry_url") == stderr.count("peer.grpc_endpoint") == 1


def test_credentials_create_list_revoke(cli: Cli) -> None:
    name = f"mesh-{secrets.token_hex(3)}"
    created = ok(cli("federation", "credentials", "create", name))
    credential_id = created["credential"]["id"]
    assert created["credential"]["name"] == name
    assert created["token"].startswith("avf_")
    assert credential_id in created["token"]

    listed = ok(cli("federation", "credentials", "list"))
    mine = [c for c in listed["credentials"] if c["id"] == credential_id]
    assert len(mine) == 1
    assert "revoke_time" not in mine[0]
    assert created["token"] not in json.dumps(listed), "tokens are shown once"

    revoked = ok(cli("federation", "credentials", "revoke", credential_id))
    assert revoked["revoke_time"]
    table = cli("-o", "table", "federation", "credentials", "list")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(credential_id))
    assert name in row
    assert revoked["revoke_time"] in row


def test_federation_commands_are_refused_to_a_member(cli: Cli) -> None:
    token = member_token(cli)
    for args in (
        ("federation", "peers", "list"),
        ("federation", "peers", "create", "--name", "x", "--registry-url", "https://x.example", "--api-key", "k"),
        ("federation", "peers", "get", "00000000-0000-0000-0000-000000000000"),
        ("federation", "peers", "delete", "00000000-0000-0000-0000-000000000000"),
        ("federation", "credentials", "create", "sneaky"),
        ("federation", "credentials", "list"),
        ("federation", "credentials", "revoke", "abc"),
    ):
        stderr = assert_clean_failure(cli(*args, token=token), 1)
        assert "PERMISSION_DENIED" in stderr, args
        assert "ADMIN_REQUIRED" in stderr, args


def discover_until(cli: Cli, check: Any, *args: str, seconds: float = 20.0) -> dict[str, Any]:
    """Runs `discover` until `check(reply)` holds: the aggregator picks up a new peer on its next re-read."""
    deadline = time.monotonic() + seconds
    while True:
        reply = ok(cli("discover", *args))
        if check(reply) or time.monotonic() > deadline:
            return dict(reply)
        time.sleep(0.2)


def test_discover_searches_the_mesh_and_its_peers(cli: Cli, client_mesh: MeshHandle, peer_mesh: MeshHandle) -> None:
    word = f"zq{secrets.token_hex(5)}"
    on_peer = ["--registry", peer_mesh.address("registry"), "--token", peer_mesh.admin_token]
    # The peer issues a credential for this mesh and shares an agent; this mesh has one of its own.
    token = ok(cli("federation", "credentials", "create", "client-mesh", *on_peer))["token"]
    remote = ok(cli("agents", "create", "--did", unique_did("remote"), "--name", f"Remote {word}",
                    "--version", "1.0.0", "--capability", "skill:translate@2.0.0", "--sharing", "federated",
                    *on_peer))  # fmt: skip
    local = ok(cli("agents", "create", "--did", unique_did("local"), "--name", f"Local {word}",
                   "--version", "1.0.0", "--capability", "skill:translate@1.0.0",
                   "--sharing", "federated"))  # fmt: skip

    alone = ok(cli("discover", word))
    assert [a["did"] for a in alone["agents"]] == [local["did"]]
    assert alone["agents"][0]["is_federated"] is False

    peer_name = f"Peer {secrets.token_hex(3)}"
    peer = ok(cli("federation", "peers", "create", "--name", peer_name,
                  "--registry-url", f"http://{peer_mesh.address('registry')}", "--api-key", "-",
                  "--protocol", "grpc", "--grpc-endpoint", peer_mesh.address("registry"),
                  stdin=token + "\n"))  # fmt: skip
    try:
        reply = discover_until(
            cli,
            lambda r: remote["did"] in [a["did"] for a in r["agents"]],
            word,
            "--include-federated",
            "--force-refresh",
        )
        found = {a["did"]: a for a in reply["agents"]}
        assert set(found) == {local["did"], remote["did"]}
        assert found[remote["did"]]["is_federated"] is True
        assert found[remote["did"]]["registry_name"] == peer_name, "named as this mesh knows the peer"
        stats = reply["federation_stats"]
        assert stats["successful_queries"] >= 1
        mine = next(p for p in stats["peers"] if p["peer_id"] == peer["id"])
        assert (mine["name"], mine["status"], mine["result_count"]) == (peer_name, "ok", 1)

        # The filters reach the aggregator: only the peer's agent has translate 2.x.
        filtered = ok(cli("discover", word, "--include-federated", "--capability-name", "translate",
                          "--capability-version", "^2"))  # fmt: skip
        assert [a["did"] for a in filtered["agents"]] == [remote["did"]]

        table = cli("-o", "table", "discover", word, "--include-federated", "--page-size", "1")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:3] == ["DID", "NAME", "VERSION"]
        assert lines[2].startswith("federation_stats: queried_registries=")
        assert any(line.startswith(peer_name) and " ok " in line for line in lines)
        assert lines[-1].startswith("next_page_token: ")
    finally:
        ok(cli("federation", "peers", "delete", peer["id"]))
