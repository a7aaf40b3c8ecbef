"""The `agentvault` policy commands against a real registry: policies, permission requests, approvals, grants."""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.client.conftest import CLI, REGISTRY_ONLY, Cli
from tests.client.test_cli import assert_clean_failure, ok
from tests.conftest import MeshFactory, MeshHandle, unique_did

ASK = '@decision("ask") permit(principal, action == Action::"capability.request", resource)'


def member(cli: Cli) -> tuple[str, str]:
    """A new member API key: its principal id and token."""
    created = ok(cli("keys", "create", f"policy-{secrets.token_hex(4)}", "--role", "member"))
    return created["api_key"]["principal_id"], created["token"]


def agent_with_skill(cli: Cli, skill: str = "summarize") -> str:
    """An agent (owned by the admin) offering `skill`, visible to members."""
    agent = ok(
        cli("agents", "create", "--did", unique_did("pol"), "--name", "policy target", "--version", "1.0.0",
            "--capability", f"skill:{skill}@1.2.0", "--sharing", "local")
    )  # fmt: skip
    return str(agent["id"])


@pytest.fixture
def policies(cli: Cli) -> Iterator[list[str]]:
    """Ids of the policies a test creates: deleted after it, since policies apply to the whole shared mesh."""
    ids: list[str] = []
    yield ids
    for policy_id in ids:
        cli("policies", "delete", policy_id)


def ask_policy(cli: Cli, policies: list[str], principal_id: str) -> str:
    """An enabled policy asking about every capability request of `principal_id` (and nobody else's)."""
    text = ASK.replace("permit(principal,", f'permit(principal == Caller::Person::"{principal_id}",')
    created = ok(cli("policies", "create", "--name", f"ask-{principal_id}", "--text", text + ";", "--enabled"))
    policies.append(created["id"])
    return str(created["id"])


def test_policies_create_list_get_update_explain_delete(cli: Cli, policies: list[str], tmp_path: Any) -> None:
    principal_id, _ = member(cli)
    agent_id = agent_with_skill(cli)
    path = tmp_path / "ask.cedar"
    path.write_text(ASK.replace("permit(principal,", f'permit(principal == Caller::Person::"{principal_id}",') + ";")
    name = f"cli-{secrets.token_hex(4)}"

    created = ok(cli("policies", "create", "--name", name, "--text-file", str(path), "--description", "asks"))
    policies.append(created["id"])
    assert (created["name"], created["description"], created["enabled"]) == (name, "asks", False)
    assert created["text"] == path.read_text()
    assert set(created) >= {"id", "created_by", "create_time", "update_time"}
    assert ok(cli("policies", "get", created["id"])) == created
    assert created["id"] in {p["id"] for p in ok(cli("policies", "list"))["policies"]}

    explain = ("policies", "explain", "--caller-kind", "person", "--caller-id", principal_id, "--action",
               "capability.request", "--agent-id", agent_id, "--name", "summarize", "--version", "1.2.0")  # fmt: skip
    # Disabled, it decides nothing: the default deny.
    assert ok(cli(*explain))["decision"] == "deny"

    # Only the flags given are in the update mask.
    enabled = ok(cli("policies", "update", created["id"], "--enable"))
    assert (enabled["enabled"], enabled["name"], enabled["description"]) == (True, name, "asks")
    answer = ok(cli(*explain, "--trust", "basic", "--scope", "agents:read", "--at", "2026-01-01T00:00:00Z"))
    assert answer["decision"] == "ask"
    assert answer["deciding_policy_ids"] == [created["id"]]
    # Someone else's request is not this policy's business.
    other = list(explain)
    other[other.index(principal_id)] = "prn_someone_else"
    assert created["id"] not in ok(cli(*other))["matched_policy_ids"]

    renamed = ok(cli("policies", "update", created["id"], "--name", name + "-2", "--disable", "--text", ASK + ";"))
    assert (renamed["name"], renamed["enabled"], renamed["text"], renamed["description"]) == (
        name + "-2", False, ASK + ";", "asks",
    )  # fmt: skip

    table = cli("-o", "table", "policies", "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["ID", "NAME", "ENABLED", "DESCRIPTION", "CREATED_BY", "UPDATE_TIME"]

    assert ok(cli("policies", "delete", created["id"])) == {}
    policies.remove(created["id"])
    assert "NOT_FOUND" in assert_clean_failure(cli("policies", "get", created["id"]), 1)


def test_policy_bad_input_is_a_clear_error(cli: Cli, tmp_path: Any) -> None:
    # Cedar the schema rejects: INVALID_ARGUMENT, exit 2, the field named.
    bad = cli(
        "policies", "create", "--name", f"bad-{secrets.token_hex(4)}", "--text", "permit(principal, action, resourc);"
    )
    assert "text" in assert_clean_failure(bad, 2)
    assert "--text-file" in assert_clean_failure(cli("policies", "create", "--name", "x"), 2)
    missing = cli("policies", "create", "--name", "x", "--text-file", str(tmp_path / "absent.cedar"))
    assert "cannot read" in assert_clean_failure(missing, 2)
    assert "nothing to update" in assert_clean_failure(cli("policies", "update", "0" * 8), 2)
    at = cli("policies", "explain", "--caller-id", "c", "--action", "agent.read", "--agent-id", "a", "--at", "soon")
    assert "--at" in assert_clean_failure(at, 2)
    # argparse's own refusals: a usage line and exit 2.
    usage = cli("connections", "set-trust", "x", "--level", "godlike", "--reason", "r")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr and "Traceback" not in usage.stderr
    assert "INVALID_ARGUMENT" in assert_clean_failure(cli("approvals", "get", "not-a-uuid"), 2)
    # A watch that cannot start fails like any call.
    unreachable = cli("approvals", "watch", env={"REGISTRY_ADDR": "127.0.0.1:1"})
    assert "cannot reach the registry at 127.0.0.1:1" in assert_clean_failure(unreachable, 1)
    assert "UNAUTHENTICATED" in assert_clean_failure(cli("approvals", "watch", token=""), 1)
    request = cli("capabilities", "request", "not-a-uuid", "summarize", "--wait", "600")
    stderr = assert_clean_failure(request, 2)
    assert "agent_id" in stderr and "wait_seconds" in stderr


def test_capability_request_deny_ask_approve_grant_revoke(cli: Cli, policies: list[str]) -> None:
    principal_id, token = member(cli)
    agent_id = agent_with_skill(cli)
    request = ("capabilities", "request", agent_id, "summarize", "--purpose", "weekly digest")

    # No policy names this caller: the default deny, and exit 0 all the same.
    denied = ok(cli(*request, token=token))
    assert denied["decision"] == "deny"
    assert denied["reasons"]
    assert denied["version"] == "1.2.0"
    logged = ok(cli("decisions", "list", "--outcome", "deny"))["decisions"]
    assert any(principal_id in d["caller"] and d["action"] == "capability.request" for d in logged)
    assert {d["outcome"] for d in logged} == {"deny"}

    # The requester's first contact made a connection: list, get, set its trust, its changes.
    connections = ok(cli("connections", "list", "--agent-id", agent_id))["connections"]
    mine = [c for c in connections if c["caller_id"] == principal_id]
    assert len(mine) == 1, connections
    connection = mine[0]
    assert connection["caller_kind"] == "person"
    assert ok(cli("connections", "get", connection["id"]))["id"] == connection["id"]
    assert connection["trust_level"] != "trusted"
    trusted = ok(cli("connections", "set-trust", connection["id"], "--level", "trusted", "--reason", "known team"))
    assert trusted["trust_level"] == "trusted"
    assert connection["id"] in {
        c["id"] for c in ok(cli("connections", "list", "--trust-level", "trusted"))["connections"]
    }
    changes = ok(cli("connections", "changes", connection["id"]))["changes"]
    assert (changes[0]["from_level"], changes[0]["to_level"]) == (connection["trust_level"], "trusted")
    assert changes[0]["reason"] == "known team"
    assert changes[0]["changed_by"] == "prn_bootstrap_admin"
    assert ok(cli("connections", "get", connection["id"]))["recent_changes"][0]["to_level"] == "trusted"

    # A policy asking about this caller's requests: ask, with a pending approval.
    ask_policy(cli, policies, principal_id)
    asked = wait_for_decision(cli, request, token, "ask")
    approval = asked["approval"]
    assert approval["status"] == "pending"
    assert approval["purpose"] == "weekly digest"
    pending = ok(cli("approvals", "list", "--status", "pending"))["approvals"]
    assert approval["id"] in {a["id"] for a in pending}
    assert {a["status"] for a in pending} == {"pending"}
    assert ok(cli("approvals", "get", approval["id"]))["id"] == approval["id"]

    approved = ok(cli("approvals", "approve", approval["id"], "--duration", "600", "--uses", "3", "--note", "ok"))
    assert approved["status"] == "approved"
    assert approved["grant_id"]
    assert approved["note"] == "ok"
    grants = ok(cli("grants", "list"))["grants"]
    grant = next(g for g in grants if g["id"] == approved["grant_id"])
    assert grant["uses_left"] == 3
    assert grant["approval_id"] == approval["id"]
    # The requester sees its own grant too.
    assert approved["grant_id"] in {g["id"] for g in ok(cli("grants", "list", token=token))["grants"]}

    revoked = ok(cli("grants", "revoke", grant["id"]))
    assert revoked["revoke_time"]
    assert grant["id"] not in {g["id"] for g in ok(cli("grants", "list"))["grants"]}
    assert grant["id"] in {g["id"] for g in ok(cli("grants", "list", "--all"))["grants"]}
    # Answered once is answered.
    assert_clean_failure(cli("approvals", "approve", approval["id"]), 1)

    # Another ask, denied with a note.
    second = ok(cli(*request, token=token))["approval"]
    refused = ok(cli("approvals", "deny", second["id"], "--note", "not this week"))
    assert (refused["status"], refused["note"], refused["grant_id"]) == ("denied", "not this week", "")
    assert second["id"] not in {a["id"] for a in ok(cli("approvals", "list", "--status", "pending"))["approvals"]}

    table = cli("-o", "table", "approvals", "list", "--status", "denied")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "CALLER"]


def wait_for_decision(cli: Cli, request: tuple[str, ...], token: str, decision: str) -> dict[str, Any]:
    """The request's answer once it is `decision`: a new policy reaches the enforcer through its watch."""
    deadline = time.monotonic() + 15
    while True:
        answer = ok(cli(*request, token=token))
        if answer["decision"] == decision or time.monotonic() > deadline:
            assert answer["decision"] == decision, answer
            return dict(answer)
        time.sleep(0.1)


def _lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def test_approvals_watch_prints_events_and_exits_0_on_sigint(
    cli: Cli, client_mesh: MeshHandle, policies: list[str]
) -> None:
    principal_id, token = member(cli)
    agent_id = agent_with_skill(cli, "translate")
    ask_policy(cli, policies, principal_id)
    request = ("capabilities", "request", agent_id, "translate")
    wait_for_decision(cli, request, token, "ask")  # the policy is in force

    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_ADDR", "AGENTVAULT_TOKEN")}
    env |= {"REGISTRY_ADDR": client_mesh.address("registry"), "AGENTVAULT_TOKEN": token}
    # The requester watches its own approvals; the first lines are those already pending.
    watch = subprocess.Popen(
        [*CLI, "approvals", "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(watch.stdout, lines), daemon=True).start()
    try:
        # Requests until one arrives as `created`: the watch may not be subscribed yet when the first is made.
        created = None
        deadline = time.monotonic() + 20
        while created is None and time.monotonic() < deadline:
            approval_id = ok(cli(*request, token=token))["approval"]["id"]
            try:
                while True:
                    event = json.loads(lines.get(timeout=1))
                    assert set(event) == {"event", "approval"}
                    if event["event"] == "created" and event["approval"]["id"] == approval_id:
                        created = event
                        break
            except queue.Empty:
                continue
        assert created is not None, "no created event"
        assert created["approval"]["status"] == "pending"
        assert created["approval"]["target_agent_id"] == agent_id
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=15) == 0
        assert watch.stderr is not None
        assert watch.stderr.read() == ""
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()


def test_agents_import_card_and_card(cli: Cli) -> None:
    agent_id = agent_with_skill(cli, "card-skill")
    card = ok(cli("agents", "card", agent_id))
    assert card["name"] == "policy target"
    assert "card-skill" in {s.get("id") or s.get("name") for s in card["skills"]}

    card["name"] = f"imported {secrets.token_hex(3)}"
    imported = ok(cli("agents", "import-card", "--file", "-", "--did", unique_did("card"), stdin=json.dumps(card)))
    assert imported["name"] == card["name"]
    assert [c["kind"] for c in imported["capabilities"]] == ["skill"]
    assert "one of them" in assert_clean_failure(cli("agents", "import-card"), 2)
    assert "card_url" in assert_clean_failure(cli("agents", "import-card", "ftp://example.com/card"), 2)


def test_approvals_watch_exits_0_when_the_registry_ends_it(mesh_factory: MeshFactory) -> None:
    # A mesh of its own, since the test stops its registry; a short grace so the shutdown cuts the watch soon.
    mesh = mesh_factory(services=REGISTRY_ONLY, name="watch_end", env={"SHUTDOWN_GRACE_SECONDS": "1"})
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_ADDR", "AGENTVAULT_TOKEN")}
    env |= {"REGISTRY_ADDR": mesh.address("registry"), "AGENTVAULT_TOKEN": mesh.admin_token}

    def run(*args: str) -> Any:
        return ok(subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60, check=False))

    agent = run("agents", "create", "--did", unique_did("end"), "--name", "e", "--version", "1.0.0",
                "--capability", "skill:end@1.0.0")  # fmt: skip
    run("policies", "create", "--name", "ask all", "--text", ASK + ";", "--enabled")
    deadline = time.monotonic() + 15
    while run("capabilities", "request", agent["id"], "end")["decision"] != "ask":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    watch = subprocess.Popen(
        [*CLI, "approvals", "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert watch.stdout is not None and watch.stderr is not None
    try:
        assert json.loads(watch.stdout.readline())["event"] == "pending"
        mesh.mesh.stop_service("registry")
        assert watch.wait(timeout=20) == 0
        assert watch.stderr.read() == ""
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
