"""The `agentvault` messaging commands against a real registry and messaging service: send, inbox, dead letters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from agentvault.client.cli import main
from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tests.client.conftest import CLI
from tests.client.test_cli import assert_clean_failure, ok
from tests.conftest import MeshFactory
from tests.messaging.conftest import MESSAGING_ENV, POLICIES, LocalAgent, Net, local_agent, policy

REGISTRY_AND_MESSAGING = tuple(s for s in SERVICES if s.name in ("registry", "messaging"))


@pytest.fixture(scope="module")
async def net(mesh_factory: MeshFactory) -> AsyncIterator[Net]:
    """A mesh of a registry and a messaging service whose policies let any agent message any other."""
    mesh = mesh_factory(
        services=REGISTRY_AND_MESSAGING,
        name="cli_messaging",
        env={**MESSAGING_ENV, "MESSAGING_METRICS_PORT": str(free_port())},
    )
    async with (
        grpc.aio.insecure_channel(mesh.address("registry")) as reg,
        grpc.aio.insecure_channel(mesh.address("messaging")) as msg,
    ):
        n = Net(
            mesh,
            pb_grpc.RegistryServiceStub(reg),
            ipb_grpc.IdentityServiceStub(reg),
            ppb_grpc.PolicyServiceStub(reg),
            mpb_grpc.MessagingServiceStub(msg),
        )
        for text in POLICIES:
            await policy(n, text)
        yield n


def _env(n: Net, token: str) -> dict[str, str]:
    variables = {
        "REGISTRY_ADDR": n.mesh.address("registry"),
        "MESSAGING_ADDR": n.mesh.address("messaging"),
        "AGENTVAULT_TOKEN": token,
    }
    return {k: v for k, v in os.environ.items() if k not in variables} | variables


async def cli(n: Net, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the real `agentvault` executable (as the admin unless told otherwise) without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(n, n.mesh.admin_token if token is None else token),
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, stdout.decode(), stderr.decode())


async def send(n: Net, sender: LocalAgent, to: LocalAgent, *extra: str) -> dict[str, Any]:
    return dict(ok(await cli(n, "messages", "send", "--to", to.id, *extra, token=sender.token)))


async def receive_one(n: Net, agent: LocalAgent, *extra: str) -> dict[str, Any]:
    got = ok(await cli(n, "inbox", "receive", "--wait", "10", "--max", "1", *extra, token=agent.token))
    assert len(got["deliveries"]) == 1, got
    return dict(got["deliveries"][0])


async def test_send_receive_ack_get_list(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    sent = await send(net, alice, bob, "--text", "hello bob", "--header", "topic=greeting", "--key", "job-1")
    message = sent["message"]
    assert (message["status"], message["sender"]["agent_id"], sent["duplicate"]) == ("accepted", alice.id, False)
    uuid.UUID(message["id"])
    # The same key again is the same message.
    again = await send(net, alice, bob, "--text", "hello bob", "--header", "topic=greeting", "--key", "job-1")
    assert (again["message"]["id"], again["duplicate"]) == (message["id"], True)

    # Printed, then acknowledged: the printed delivery is the message, and its status becomes acknowledged.
    delivery = await receive_one(net, bob, "--ack")
    assert delivery["message"]["id"] == message["id"]
    assert delivery["message"]["parts"][0]["text"] == "hello bob"
    assert delivery["message"]["headers"] == {"topic": "greeting"}
    assert delivery["attempt"] == 1 and delivery["receipt"]
    got = ok(await cli(net, "messages", "get", message["id"], token=alice.token))
    assert got["status"] == "acknowledged"
    # Nothing is left to receive: the ack took it.
    assert ok(await cli(net, "inbox", "receive", token=bob.token)) == {"deliveries": []}

    # JSON data and a file are parts too; the list filters by conversation.
    data = await send(net, alice, bob, "--data", '{"n": [1, 2]}', "--conversation", "conv-" + uuid.uuid4().hex)
    conversation = data["message"]["conversation_id"]
    # The sender lists what it sent (store.Store.page's viewer filter includes the sender's inbox).
    listed = ok(await cli(net, "messages", "list", "--conversation", conversation, token=alice.token))["messages"]
    assert [m["id"] for m in listed] == [data["message"]["id"]]
    assert listed[0]["parts"][0]["data"] == {"n": [1, 2]}
    table = await cli(net, "-o", "table", "messages", "list", "--agent", bob.id, "--status", "acknowledged")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATUS", "SENDER.AGENT_ID", "RECIPIENT.AGENT_ID"]
    assert any(line.split()[:2] == [message["id"], "acknowledged"] for line in lines[1:])


async def test_send_waits_for_the_reply_the_other_side_sends(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    waiting = asyncio.ensure_future(send(net, alice, bob, "--text", "summarize", "--wait-reply", "30"))
    delivery = await receive_one(net, bob, "--ack")
    assert not waiting.done()
    original = delivery["message"]
    reply = ok(await cli(net, "messages", "send", "--reply-to", original["id"], "--text", "done", token=bob.token))
    sent = await asyncio.wait_for(waiting, 60)
    assert sent["message"]["id"] == original["id"]
    assert sent["reply"]["id"] == reply["message"]["id"]
    assert (sent["reply"]["in_reply_to"], sent["reply"]["parts"][0]["text"]) == (original["id"], "done")
    assert sent["reply"]["correlation_id"] == original["correlation_id"]

    # No reply in time: `reply` is null, and the send still succeeded.
    unanswered = await send(net, alice, bob, "--text", "anyone?", "--wait-reply", "0")
    assert unanswered["reply"] is None and unanswered["message"]["status"] == "accepted"


async def test_nack_dead_letters_list_replay_purge(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message = (await send(net, alice, bob, "--text", "poison"))["message"]
    delivery = await receive_one(net, bob)
    nacked = await cli(net, "inbox", "nack", message["id"], delivery["receipt"], "--dead-letter", "--reason", "bad",
                       token=bob.token)  # fmt: skip
    assert ok(nacked) == {}
    dead = ok(await cli(net, "dead-letters", "list", "--agent", bob.id))["messages"]
    assert [(m["id"], m["status"], m["status_reason"]) for m in dead] == [(message["id"], "dead_lettered", "bad")]
    # Admins only.
    assert "PERMISSION_DENIED" in assert_clean_failure(await cli(net, "dead-letters", "list", token=alice.token), 1)

    replayed = ok(await cli(net, "dead-letters", "replay", message["id"]))
    assert (replayed["id"], replayed["status"]) == (message["id"], "accepted")
    again = await receive_one(net, bob)
    assert again["message"]["id"] == message["id"]
    assert ok(await cli(net, "inbox", "nack", message["id"], again["receipt"], "--dead-letter", token=bob.token)) == {}

    assert ok(await cli(net, "dead-letters", "purge", "--agent", bob.id, "--yes")) == {"purged": 1}
    assert ok(await cli(net, "dead-letters", "list", "--agent", bob.id))["messages"] == []


async def test_bad_input_is_a_clear_error(net: Net) -> None:
    alice = await local_agent(net)
    # The server's INVALID_ARGUMENT: exit 2, the field named.
    assert "id: must be a UUID" in assert_clean_failure(await cli(net, "messages", "get", "not-a-uuid"), 2)
    ack = await cli(net, "inbox", "ack", "not-a-uuid", str(uuid.uuid4()), token=alice.token)
    assert "message_id: must be a UUID" in assert_clean_failure(ack, 2)
    unknown = await cli(net, "messages", "send", "--to", str(uuid.uuid4()), "--text", "x", token=alice.token)
    assert "NOT_FOUND" in assert_clean_failure(unknown, 1)
    unreachable = await cli(net, "messages", "get", str(uuid.uuid4()), "--messaging", "127.0.0.1:1", "--timeout", "1")
    stderr = assert_clean_failure(unreachable, 1)
    assert "the messaging service at 127.0.0.1:1" in stderr and "--messaging" in stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["messages", "send", "--text", "x"], "--to AGENT_ID"),
        (["messages", "send", "--to", "a", "--data", "{nope"], "--data: invalid JSON"),
        (["messages", "send", "--to", "a", "--text", "x", "--wait-reply", "61"], "--wait-reply: must be from 0 to 60"),
        (["messages", "send", "--to", "a", "--text", "x", "--header", "novalue"], "--header: expected NAME=VALUE"),
        (["messages", "send", "--to", "a", "--file", "/nonexistent/f.bin"], "cannot read /nonexistent/f.bin"),
        (["dead-letters", "purge", "--before", "last week", "--yes"], "--before: expected an RFC 3339 time"),
        (["dead-letters", "purge"], "add --yes"),
    ],
)
def test_usage_errors_are_found_before_any_call(
    argv: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process, towards an address where nothing listens: a call would fail with exit 1 instead.
    monkeypatch.setenv("MESSAGING_ADDR", "127.0.0.1:1")
    assert main([*argv, "--timeout", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("agentvault: error: ") and expected in err, err


def test_argparse_refusals_are_a_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["messages", "watch", "--id", "x", "--agent", "y"])
    assert exited.value.code == 2 and "not allowed with" in capsys.readouterr().err


async def _line(stream: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), 30)
    assert line, "the stream ended"
    return dict(json.loads(line))


async def _interrupt(proc: asyncio.subprocess.Process) -> None:
    """Ctrl-C: exit 0 and nothing on stderr."""
    assert proc.stderr is not None
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert await proc.stderr.read() == b""


async def test_inbox_stream_acks_and_watch_prints_status_changes_until_ctrl_c(net: Net) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    message = (await send(net, alice, bob, "--text", "streamed"))["message"]
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    watch = await asyncio.create_subprocess_exec(
        *CLI, "messages", "watch", "--id", message["id"], env=_env(net, alice.token), **pipes
    )
    stream = await asyncio.create_subprocess_exec(*CLI, "inbox", "stream", "--ack", env=_env(net, bob.token), **pipes)
    try:
        assert watch.stdout is not None and stream.stdout is not None
        # The watch starts with the current status (the stream may already have taken it), then each change.
        first = await _line(watch.stdout)
        assert first["message"]["id"] == message["id"]
        delivery = await _line(stream.stdout)
        assert (delivery["message"]["id"], delivery["message"]["parts"][0]["text"]) == (message["id"], "streamed")
        statuses = [first["status"]]
        while statuses[-1] != "acknowledged":
            statuses.append((await _line(watch.stdout))["status"])
        assert set(statuses) <= {"accepted", "delivered", "acknowledged"}
        assert ok(await cli(net, "messages", "get", message["id"], token=alice.token))["status"] == "acknowledged"
        await _interrupt(stream)
        await _interrupt(watch)
    finally:
        for proc in (watch, stream):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
