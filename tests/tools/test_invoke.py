"""ToolService: ListTools filtered by policy, InvokeTool's progress, results, tool errors, refusals and approvals."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_status import rpc_status

from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.policy.v1 import policy_service_pb2 as ppb

from ..conftest import auth, bearer, edge_violations, eventually
from ..registry.oauth_helpers import basic, create_client, token
from .conftest import ToolNet, register_mcp_agent, tools_of

ALL = {"add", "slow", "fail", "hang"}


@dataclass
class Setup:
    open_id: str
    guarded_id: str
    md: list[tuple[str, str]]


async def policy(n: ToolNet, text: str) -> None:
    await n.policies.CreatePolicy(
        ppb.CreatePolicyRequest(policy=ppb.Policy(name=f"p-{secrets.token_hex(6)}", text=text, enabled=True)),
        metadata=n.admin,
    )


@pytest.fixture(scope="module")
async def setup(tnet: ToolNet) -> Setup:
    """Two registrations of the MCP test server: every tool of `open` may be invoked; of `guarded`, add asks for an
    approval, slow is forbidden with a reason, the others fall to the default deny."""
    open_agent = await register_mcp_agent(tnet, name="open tools")
    guarded = await register_mcp_agent(tnet, name="guarded tools")
    await policy(tnet, 'permit(principal, action == Action::"tool.list", resource);')
    await policy(
        tnet,
        f'permit(principal, action == Action::"tool.invoke", resource) when {{ resource.agent == "{open_agent.id}" }};',
    )
    await policy(
        tnet,
        '@decision("ask") @reason("adding needs the owner\'s approval")\n'
        f'permit(principal, action == Action::"tool.invoke", resource) when {{ resource.agent == "{guarded.id}" '
        '&& resource.name == "add" };',
    )
    await policy(
        tnet,
        '@reason("slow is closed on this agent")\n'
        f'forbid(principal, action == Action::"tool.invoke", resource) when {{ resource.agent == "{guarded.id}" '
        '&& resource.name == "slow" };',
    )
    created = await create_client(tnet.identity, tnet.mesh.admin_token, scopes=["agents:read", "tools:invoke"])
    answer = await token(
        tnet.identity, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret)
    )
    md = bearer(answer.body["access_token"])

    async def ready() -> None:
        assert set(await tools_of(tnet, open_agent.id)) == ALL
        assert set(await tools_of(tnet, guarded.id)) == ALL
        listed = await tnet.tools.ListTools(tpb.ListToolsRequest(agent_id=guarded.id), metadata=md)
        assert {t.name for t in listed.tools} == {"add"}

    await eventually(ready, 30)
    return Setup(open_agent.id, guarded.id, md)


def args(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def invoke(n: ToolNet, s: Setup, agent_id: str, tool: str, timeout: float = 20, **values: object) -> list:
    call = n.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=agent_id, tool=tool, arguments=args(**values)), metadata=s.md, timeout=timeout
    )
    return [event async for event in call]


def reason(exc: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(exc)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def test_list_tools_is_filtered_by_policy(tnet: ToolNet, setup: Setup) -> None:
    listed = await tnet.tools.ListTools(tpb.ListToolsRequest(), metadata=setup.md)
    by_agent: dict[str, set[str]] = {}
    for t in listed.tools:
        by_agent.setdefault(t.agent_id, set()).add(t.name)
    assert by_agent[setup.open_id] == ALL
    assert by_agent[setup.guarded_id] == {"add"}
    add = next(t for t in listed.tools if t.agent_id == setup.open_id and t.name == "add")
    assert '"required":["a","b"]' in add.input_schema


async def test_fast_tool_result(tnet: ToolNet, setup: Setup) -> None:
    events = await invoke(tnet, setup, setup.open_id, "add", a=2, b=40)
    assert [e.WhichOneof("event") for e in events] == ["result"]
    result = events[0].result
    assert not result.is_error
    assert result.structured_content["result"] == 42
    assert result.content[0]["text"] == "42"


async def test_slow_tool_streams_progress_then_result(tnet: ToolNet, setup: Setup) -> None:
    events = await invoke(tnet, setup, setup.open_id, "slow", steps=3)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress", "progress", "progress", "result"]
    assert [e.progress.progress for e in events[:3]] == [1, 2, 3]
    assert events[0].progress.total == 3 and events[0].progress.message == "step 1"
    assert events[-1].result.structured_content["result"] == "counted to 3"


async def test_failing_tool_is_a_tool_error_not_a_call_failure(tnet: ToolNet, setup: Setup) -> None:
    events = await invoke(tnet, setup, setup.open_id, "fail", why="testing")
    assert len(events) == 1 and events[0].result.is_error
    assert events[0].result.content


async def test_bad_arguments_are_invalid_argument_with_field_violations(tnet: ToolNet, setup: Setup) -> None:
    from google.rpc import error_details_pb2

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(tnet, setup, setup.open_id, "add", a="two")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = set()
    for detail in rpc_status.from_call(refused.value).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    assert "arguments/a" in fields  # wrong type
    assert "arguments" in fields  # b missing


async def test_unknown_tool_is_not_found(tnet: ToolNet, setup: Setup) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(tnet, setup, setup.open_id, "nope")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and reason(refused.value) == "TOOL_NOT_FOUND"


async def test_denied_tool_is_refused_with_reasons(tnet: ToolNet, setup: Setup) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(tnet, setup, setup.guarded_id, "slow", steps=1)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(refused.value) == "TOOL_DENIED"
    assert "slow is closed on this agent" in (refused.value.details() or "")


async def test_deadline_is_enforced(tnet: ToolNet, setup: Setup) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(tnet, setup, setup.open_id, "hang", timeout=1.5)
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_ask_waits_for_the_approval_then_runs(tnet: ToolNet, setup: Setup) -> None:
    call = tnet.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=setup.guarded_id, tool="add", arguments=args(a=1, b=1)),
        metadata=setup.md,
        timeout=30,
    )
    first = await call.read()
    assert first.WhichOneof("event") == "approval_pending"
    assert any("adding needs the owner's approval" in r for r in first.approval_pending.reasons)
    await tnet.policies.ApproveApproval(
        ppb.ApproveApprovalRequest(id=first.approval_pending.approval_id), metadata=tnet.admin
    )
    rest = []
    while (event := await call.read()) is not grpc.aio.EOF:
        rest.append(event)
    assert rest[-1].result.structured_content["result"] == 2


async def test_ask_without_an_answer_ends_at_the_deadline_with_the_approval_id(tnet: ToolNet, setup: Setup) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(tnet, setup, setup.guarded_id, "add", timeout=1.5, a=1, b=2)
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_denied_approval_is_refused(tnet: ToolNet, setup: Setup) -> None:
    call = tnet.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=setup.guarded_id, tool="add", arguments=args(a=1, b=1)),
        metadata=setup.md,
        timeout=30,
    )
    first = await call.read()
    await tnet.policies.DenyApproval(
        ppb.DenyApprovalRequest(id=first.approval_pending.approval_id), metadata=tnet.admin
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(refused.value) == "TOOL_APPROVAL_DENIED"


async def test_invoking_needs_tools_invoke(tnet: ToolNet, setup: Setup) -> None:
    created = await create_client(tnet.identity, tnet.mesh.admin_token, scopes=["agents:read"])
    answer = await token(
        tnet.identity, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret)
    )
    call = tnet.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=setup.open_id, tool="add", arguments=args(a=1, b=1)),
        metadata=bearer(answer.body["access_token"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        _ = [event async for event in call]
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def seen(n: ToolNet) -> dict[str, int]:
    url = n.server.url.removesuffix("/mcp") + "/seen"
    async with aiohttp.ClientSession() as http, http.get(url, headers=auth(n.server.token)) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def test_cancelling_the_call_cancels_the_tool(tnet: ToolNet, setup: Setup) -> None:
    before = await seen(tnet)
    call = tnet.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=setup.open_id, tool="hang"), metadata=setup.md, timeout=60
    )

    async def started() -> None:
        assert (await seen(tnet))["hang_started"] > before["hang_started"]

    await eventually(started, 10)
    call.cancel()

    async def cancelled() -> None:
        assert (await seen(tnet))["hang_cancelled"] > before["hang_cancelled"]

    await eventually(cancelled, 10)


async def test_rest_invoke_streams_sse(tnet: ToolNet, setup: Setup) -> None:
    token = setup.md[0][1].removeprefix("Bearer ")
    url = tnet.mesh.url(f"/api/v1/agents/{setup.open_id}/tools/slow:invoke")
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json={"arguments": {"steps": 2}}, headers=auth(token)) as resp,
    ):
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = [json.loads(line[6:]) async for line in _lines(resp) if line.startswith("data: ")]
    assert [e["progress"]["progress"] for e in events[:2]] == [1, 2]
    assert events[-1]["result"]["structured_content"]["result"] == "counted to 2"
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            tnet.mesh.url(f"/api/v1/agents/{setup.open_id}/tools/add:invoke"),
            json={"arguments": {"a": "x", "b": 1}},
            headers=auth(token),
        ) as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
        assert "arguments/a" in edge_violations(body)


async def _lines(resp: aiohttp.ClientResponse) -> Any:
    async for raw in resp.content:
        yield raw.decode().rstrip("\n")


async def test_every_invocation_is_audited(tnet: ToolNet, setup: Setup) -> None:
    """The outcome of each invocation reaches the policy engine's decision log: a result and a tool error."""
    await invoke(tnet, setup, setup.open_id, "fail", why="audit")
    target = f'Target::Tool::"{setup.open_id}/fail"'

    async def logged() -> None:
        page = await tnet.policies.ListDecisions(ppb.ListDecisionsRequest(page_size=500), metadata=tnet.admin)
        mine = [d for d in page.decisions if d.target == target and d.action == "tool.invoke"]
        assert any("invocation tool error" in d.reason for d in mine), [d.reason for d in mine]

    await eventually(logged, 10)
