"""The `agentvault` executable against a real registry: each command, its JSON and table output, exit codes."""

from __future__ import annotations

import importlib.metadata
import json
import secrets
import uuid
from typing import Any

import pytest

from tests.client.conftest import Cli
from tests.conftest import unique_did

# Capability fields added by issue 11 (schemas, permissions, A2A skill details): printed, like every field, when unset.
UNSET_CAPABILITY_FIELDS = {
    "input_schema": "", "output_schema": "", "permissions": [], "title": "", "tags": [], "input_modes": [],
    "output_modes": [],
}  # fmt: skip


def ok(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def assert_clean_failure(result: Any, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("agentvault: ")
    assert result.stdout == ""
    return str(result.stderr)


def create_from_flags(cli: Cli, *extra: str, tag: str = "cli-test") -> dict[str, Any]:
    return dict(
        ok(
            cli(
                "agents",
                "create",
                "--did",
                unique_did("cli"),
                "--name",
                "CLI agent",
                "--version",
                "1.0.0",
                "--description",
                "answers questions about invoices",
                "--agent-type",
                "assistant",
                "--tag",
                tag,
                "--tag",
                "billing",
                "--capability",
                "skill:invoice-qa@1.4.0",
                "--capability",
                "tool:pdf.reader",
                "--endpoint",
                "http=https://agent.example/api?a=b",
                "--sharing",
                "federated",
                *extra,
            )
        )
    )


def test_create_from_flags_prints_the_rest_shape(cli: Cli) -> None:
    agent = create_from_flags(cli)
    assert agent["name"] == "CLI agent"
    assert agent["owner"] == "prn_bootstrap_admin"
    assert agent["sharing"] == "federated"
    assert agent["tags"] == ["cli-test", "billing"]
    assert agent["capabilities"] == [
        {"kind": "skill", "name": "invoice-qa", "version": "1.4.0", "description": "", **UNSET_CAPABILITY_FIELDS},
        {"kind": "tool", "name": "pdf.reader", "version": "", "description": "", **UNSET_CAPABILITY_FIELDS},
    ]
    assert agent["endpoints"] == [{"protocol": "http", "url": "https://agent.example/api?a=b"}]
    # Every field is printed, as the REST API does, with enum words rather than CONSTANT_NAMES.
    assert agent["health_check_url"] == ""
    assert agent["health_status"] in ("unspecified", "healthy", "degraded", "unhealthy", "unknown")
    assert set(agent) >= {"id", "did", "create_time", "update_time"}


def test_create_from_file_and_stdin(cli: Cli, tmp_path: Any) -> None:
    body = {
        "did": unique_did("file"),
        "name": "From a file",
        "version": "2.0.0",
        "capabilities": [{"kind": "model", "name": "llama", "version": "3.1.0"}],
        "endpoints": [{"protocol": "grpc", "url": "grpc://agent.example:443"}],
        "sharing": "private",
    }
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(body))
    from_file = ok(cli("agents", "create", "--file", str(path)))
    assert from_file["capabilities"][0]["kind"] == "model"
    assert from_file["endpoints"][0]["protocol"] == "grpc"
    assert from_file["sharing"] == "private"

    body["did"] = unique_did("stdin")
    # Flags given next to a file win over its fields.
    from_stdin = ok(cli("agents", "create", "-f", "-", "--name", "Overridden", stdin=json.dumps(body)))
    assert from_stdin["did"] == body["did"]
    assert from_stdin["name"] == "Overridden"


def test_get_update_delete(cli: Cli) -> None:
    created = create_from_flags(cli)
    agent_id = created["id"]
    assert ok(cli("agents", "get", agent_id)) == created

    updated = ok(cli("agents", "update", agent_id, "--description", "also does refunds", "--tag", "refunds"))
    assert updated["description"] == "also does refunds"
    assert updated["tags"] == ["refunds"]
    # Only the flags given are in the update mask: everything else is as it was.
    assert updated["name"] == created["name"]
    assert updated["capabilities"] == created["capabilities"]
    assert updated["endpoints"] == created["endpoints"]

    cleared = ok(cli("agents", "update", agent_id, "--clear", "description", "--sharing", "local"))
    assert cleared["description"] == ""
    assert cleared["sharing"] == "local"
    assert cleared["tags"] == ["refunds"]

    # From a file, the mask is the fields it names, in either JSON spelling.
    patched = ok(cli("agents", "update", agent_id, "-f", "-", stdin='{"agentType": "bot", "version": "1.1.0"}'))
    assert (patched["agent_type"], patched["version"]) == ("bot", "1.1.0")
    assert patched["name"] == created["name"]
    assert patched["tags"] == ["refunds"]

    assert ok(cli("agents", "delete", agent_id)) == {}
    stderr = assert_clean_failure(cli("agents", "get", agent_id), 1)
    assert "NOT_FOUND" in stderr
    assert agent_id in stderr


def test_list_and_search_with_filters_and_pages(cli: Cli) -> None:
    tag = f"cli-{secrets.token_hex(4)}"
    ids = {create_from_flags(cli, tag=tag)["id"] for _ in range(3)}

    page = ok(cli("agents", "list", "--tag", tag, "--page-size", "2"))
    assert len(page["agents"]) == 2
    assert page["next_page_token"]
    rest = ok(cli("agents", "list", "--tag", tag, "--page-size", "2", "--page-token", page["next_page_token"]))
    assert {a["id"] for a in page["agents"] + rest["agents"]} == ids

    everything = ok(cli("agents", "list", "--tag", tag, "--page-size", "1", "--all"))
    assert {a["id"] for a in everything["agents"]} == ids
    assert everything["next_page_token"] == ""

    filtered = ok(
        cli(
            "agents",
            "list",
            "--tag",
            tag,
            "--capability-name",
            "invoice-qa",
            "--capability-version",
            ">=1.4,<2",
            "--sharing",
            "federated",
        )
    )
    assert {a["id"] for a in filtered["agents"]} == ids
    none = ok(cli("agents", "list", "--tag", tag, "--capability-name", "invoice-qa", "--capability-version", "^2"))
    assert none["agents"] == []

    found = ok(cli("agents", "search", "invoices", "--tag", tag))
    assert {a["id"] for a in found["agents"]} == ids


def test_table_output(cli: Cli) -> None:
    tag = f"table-{secrets.token_hex(4)}"
    created = create_from_flags(cli, tag=tag)
    result = cli("--output", "table", "agents", "list", "--tag", tag)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["ID", "DID", "NAME", "VERSION", "AGENT_TYPE", "SHARING", "OWNER", "HEALTH_STATUS"]
    assert row.startswith(created["id"])
    assert "federated" in row

    # Global options may also follow the command.
    single = cli("agents", "get", created["id"], "-o", "table")
    assert single.returncode == 0, single.stderr
    lines = dict(line.split(None, 1) for line in single.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert lines["capabilities"] == "skill:invoice-qa@1.4.0, tool:pdf.reader"
    assert lines["endpoints"] == "http=https://agent.example/api?a=b"


def test_table_output_keeps_next_page_token(cli: Cli) -> None:
    tag = f"paged-{secrets.token_hex(4)}"
    ids = {create_from_flags(cli, tag=tag)["id"] for _ in range(2)}
    first = cli("-o", "table", "agents", "list", "--tag", tag, "--page-size", "1")
    assert first.returncode == 0, first.stderr
    header, row, last = first.stdout.splitlines()
    assert header.startswith("ID ")
    assert last.startswith("next_page_token: ")
    token = last.removeprefix("next_page_token: ")
    assert token == ok(cli("agents", "list", "--tag", tag, "--page-size", "1"))["next_page_token"]

    second = cli("-o", "table", "agents", "list", "--tag", tag, "--page-size", "1", "--page-token", token)
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert len(lines) == 2, "the last page has no next_page_token line"
    assert {row.split()[0], lines[1].split()[0]} == ids


def test_keys_create_list_revoke(cli: Cli) -> None:
    name = f"cli-key-{secrets.token_hex(3)}"
    created = ok(cli("keys", "create", name, "--role", "member"))
    key_id = created["api_key"]["id"]
    assert created["api_key"]["role"] == "member"
    assert created["token"].startswith(f"avk_{key_id}_")

    # The new key works, as a member: it can register agents but not manage keys.
    as_member = cli("agents", "create", "--did", unique_did("member"), "--name", "m", "--version", "1.0.0",
                    token=created["token"])  # fmt: skip
    assert ok(as_member)["owner"] == created["api_key"]["principal_id"]
    assert ok(cli("whoami", token=created["token"]))["principal_id"] == created["api_key"]["principal_id"]
    denied = assert_clean_failure(cli("keys", "list", token=created["token"]), 1)
    assert "PERMISSION_DENIED" in denied
    assert "ADMIN_REQUIRED" in denied

    listed = ok(cli("keys", "list"))
    assert key_id in [k["id"] for k in listed["api_keys"]]
    assert all("token" not in k for k in listed["api_keys"])

    revoked = ok(cli("keys", "revoke", key_id))
    assert revoked["revoke_time"]
    after = assert_clean_failure(cli("agents", "create", "--did", unique_did(), "--name", "n", "--version", "1.0.0",
                                     token=created["token"]), 1)  # fmt: skip
    assert "UNAUTHENTICATED" in after


def test_health(cli: Cli) -> None:
    reply = ok(cli("health"))
    assert reply["status"] in ("healthy", "degraded")
    assert isinstance(reply["agent_count"], int), "int64 printed as a JSON number, as the REST API does"


def test_invalid_agent_exits_2_naming_each_field_once(cli: Cli) -> None:
    result = cli("agents", "create", "--did", unique_did(), "--name", "bad", "--version", "not-semver",
                 "--capability", "skill:x@one")  # fmt: skip
    stderr = assert_clean_failure(result, 2)
    first, *rest = stderr.splitlines()
    assert first == "agentvault: INVALID_ARGUMENT: 2 invalid fields"
    assert rest == [
        "  agent.version: must be a semantic version like 1.2.3 (got 'not-semver')",
        "  agent.capabilities[0].version: must be a semantic version like 1.2.3 (got 'one')",
    ]
    # The status message already summarised the violations; each is printed once, not again below it.
    assert stderr.count("agent.version:") == 1
    assert stderr.count("agent.capabilities[0].version:") == 1


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (("agents", "create", "--capability", "summarize"), None, "expected kind:name[@version]"),
        (("agents", "create", "--capability", "skil:summarize"), None, "kind: must be one of tool, skill, model"),
        (("agents", "create", "--endpoint", "ftp=ftp://x"), None, "protocol: must be one of http"),
        (("agents", "create", "-f", "-"), "{not json", "stdin: invalid JSON"),
        (("agents", "create", "-f", "-"), '{"sharing": "everyone"}', "sharing: must be one of private, local"),
        (("agents", "create", "-f", "-"), '{"nmae": "x"}', "nmae"),
        (("agents", "create", "-f", "/nonexistent/agent.json"), None, "cannot read /nonexistent/agent.json"),
        (("agents", "update", str(uuid.uuid4())), None, "nothing to update"),
        (("--timeout", "0", "health"), None, "--timeout must be positive"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(
    cli: Cli, args: tuple[str, ...], stdin: str | None, expected: str
) -> None:
    stderr = assert_clean_failure(cli(*args, stdin=stdin), 2)
    assert expected in stderr
    assert len(stderr.splitlines()) == 1


def test_usage_errors_exit_2(cli: Cli) -> None:
    result = cli("agents", "list", "--sharing", "everyone")
    assert result.returncode == 2
    assert "invalid choice: 'everyone'" in result.stderr
    assert "Traceback" not in result.stderr
    assert cli("agents").returncode == 2


def test_unreachable_registry_is_one_line_exit_1_naming_what_to_set(cli: Cli) -> None:
    # A write is not retried, so it fails at once and says why, and how to point the tool elsewhere.
    result = cli("--registry", "127.0.0.1:1", "agents", "delete", str(uuid.uuid4()))
    stderr = assert_clean_failure(result, 1)
    assert stderr.startswith("agentvault: UNAVAILABLE: cannot reach the registry at 127.0.0.1:1: ")
    assert stderr.endswith("; set REGISTRY_ADDR or --registry\n")
    assert len(stderr.splitlines()) == 1
    # The address from the environment is named the same way.
    result = cli("keys", "revoke", "k1", env={"REGISTRY_ADDR": "127.0.0.1:1"})
    stderr = assert_clean_failure(result, 1)
    assert "cannot reach the registry at 127.0.0.1:1: " in stderr
    assert stderr.endswith("; set REGISTRY_ADDR or --registry\n")
    # A read retries until its deadline, then says the server was unreachable rather than only "deadline".
    result = cli("--registry", "127.0.0.1:1", "--timeout", "1", "agents", "get", str(uuid.uuid4()))
    stderr = assert_clean_failure(result, 1)
    assert stderr.startswith("agentvault: DEADLINE_EXCEEDED")
    assert "the registry at 127.0.0.1:1 is unreachable; set REGISTRY_ADDR or --registry" in stderr
    assert len(stderr.splitlines()) == 1


def test_unreachable_discovery_names_its_own_variable(cli: Cli) -> None:
    result = cli("discover", "--timeout", "1", "anything", env={"DISCOVERY_ADDR": "127.0.0.1:1"})
    stderr = assert_clean_failure(result, 1)
    assert "the discovery service at 127.0.0.1:1 is unreachable; set DISCOVERY_ADDR or --discovery" in stderr
    assert "REGISTRY_ADDR" not in stderr


def test_version_prints_the_package_version(cli: Cli) -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"agentvault {importlib.metadata.version('agentvault-mesh')}\n"
    # `--version` after `agents create` is still the agent's version, not the tool's.
    created = ok(cli("agents", "create", "--did", unique_did("v"), "--name", "v", "--version", "3.2.1"))
    assert created["version"] == "3.2.1"


def test_missing_credential_exits_1(cli: Cli) -> None:
    result = cli("agents", "create", "--did", unique_did(), "--name", "n", "--version", "1.0.0", token="")
    stderr = assert_clean_failure(result, 1)
    assert "UNAUTHENTICATED" in stderr
    assert "CREDENTIAL_MISSING" in stderr
