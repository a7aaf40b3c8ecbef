"""Tools across meshes: two real meshes peered both ways, a real MCP server registered in B; A's callers find B's
tools by federated search and invoke them through the federation channel, under both meshes' policies."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentvault.common import signing
from agentvault.devserver.embedded import free_port
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import tool_service_pb2 as tpb
from agentvault.messaging.v1 import tool_service_pb2_grpc as tpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshFactory, MeshHandle, auth, bearer, eventually
from ..federation.conftest import add_peer, issue_credential, unique_word
from ..registry.oauth_helpers import basic, create_client, token
from .conftest import TOOLS_ENV, McpServer, ToolNet, register_mcp_agent, tools_of

PATH = "/api/v1/federation/tools:invoke"
ALL = {"add", "slow", "fail", "hang"}


@dataclass
class Across:
    a: ToolNet
    b: ToolNet
    token_b_for_a: str  # what A presents to B
    open_id: str  # B's agent shared with peers (federated)
    closed_id: str  # another registration, shared too, whose tools A's own policy closes
    local_id: str  # a registration B keeps to itself (shared locally, not with peers)
    word: str  # in the names of B's registrations, for searches
    md: list[tuple[str, str]]  # A's caller: an OAuth client with tools:invoke


def _env(name: str) -> dict[str, str]:
    edge = free_port()
    return {
        **TOOLS_ENV,
        "EDGE_PORT": str(edge),
        "OAUTH_ISSUER": f"http://127.0.0.1:{edge}",
        "FEDERATION_REGISTRY_NAME": name,
        # A caller that went away is noticed at the edge's next write: a quick heartbeat for the cancel test.
        "EDGE_STREAM_HEARTBEAT": "0.3",
    }


@pytest.fixture(scope="module")
def two_meshes(mesh_factory: MeshFactory) -> tuple[MeshHandle, MeshHandle]:
    return mesh_factory(name="toolx_a", env=_env("mesh-a")), mesh_factory(name="toolx_b", env=_env("mesh-b"))


async def _policy(n: ToolNet, text: str) -> None:
    await n.policies.CreatePolicy(
        ppb.CreatePolicyRequest(policy=ppb.Policy(name=f"p-{secrets.token_hex(6)}", text=text, enabled=True)),
        metadata=n.admin,
    )


def _net(mesh: MeshHandle, reg: grpc.aio.Channel, msg: grpc.aio.Channel, server: McpServer) -> ToolNet:
    return ToolNet(
        mesh,
        pb_grpc.RegistryServiceStub(reg),
        ipb_grpc.IdentityServiceStub(reg),
        ppb_grpc.PolicyServiceStub(reg),
        tpb_grpc.ToolServiceStub(msg),
        server,
    )


def args(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def invoke(
    x: Across, agent_id: str, tool: str, mesh: str = "mesh-b", timeout: float = 20, **values: object
) -> list[tpb.InvokeToolEvent]:
    call = x.a.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=agent_id, tool=tool, arguments=args(**values), mesh=mesh),
        metadata=x.md,
        timeout=timeout,
    )
    return [event async for event in call]


def reason(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def seen(server: McpServer) -> dict[str, int]:
    url = server.url.removesuffix("/mcp") + "/seen"
    async with aiohttp.ClientSession() as http, http.get(url, headers=auth(server.token)) as resp:
        assert resp.status == 200
        return dict(await resp.json())


@pytest.fixture(scope="module")
async def across(
    two_meshes: tuple[MeshHandle, MeshHandle], mcp_server: McpServer, http: aiohttp.ClientSession
) -> AsyncIterator[Across]:
    a, b = two_meshes
    token_b_for_a = await issue_credential(http, b, "mesh-a")
    token_a_for_b = await issue_credential(http, a, "mesh-b")
    await add_peer(http, a, "mesh-b", b.url(), token_b_for_a)
    await add_peer(http, b, "mesh-a", a.url(), token_a_for_b)
    async with (
        grpc.aio.insecure_channel(a.address("registry")) as a_reg,
        grpc.aio.insecure_channel(a.address("messaging")) as a_msg,
        grpc.aio.insecure_channel(b.address("registry")) as b_reg,
        grpc.aio.insecure_channel(b.address("messaging")) as b_msg,
    ):
        na, nb = _net(a, a_reg, a_msg, mcp_server), _net(b, b_reg, b_msg, mcp_server)
        word = unique_word()
        shared = await register_mcp_agent(nb, name=f"open {word}", sharing=pb.SHARING_FEDERATED)
        closed = await register_mcp_agent(nb, name=f"closed {word}", sharing=pb.SHARING_FEDERATED)
        kept = await register_mcp_agent(nb, name=f"kept {word}", sharing=pb.SHARING_LOCAL)
        # A: its callers may use tools of any peer mesh, but not those of `closed`.
        await _policy(na, 'permit(principal, action == Action::"tool.invoke", resource) when { resource.mesh != "" };')
        await _policy(
            na,
            '@reason("that agent\'s tools stay closed from here")\n'
            f'forbid(principal, action == Action::"tool.invoke", resource) when {{ resource.agent == "{closed.id}" }};',
        )
        # B: peer mesh-a may invoke its tools, except add.
        await _policy(
            nb, 'permit(principal, action == Action::"tool.invoke", resource) when { principal.mesh == "mesh-a" };'
        )
        await _policy(
            nb,
            '@reason("adding is closed to peer meshes")\n'
            'forbid(principal, action == Action::"tool.invoke", resource) when { principal.mesh == "mesh-a" '
            '&& resource.name == "add" };',
        )
        created = await create_client(na.identity, a.admin_token, scopes=["agents:read", "tools:invoke"])
        answer = await token(
            na.identity, {"grant_type": "client_credentials"}, basic(created.client.client_id, created.client_secret)
        )
        x = Across(na, nb, token_b_for_a, shared.id, closed.id, kept.id, word, bearer(answer.body["access_token"]))

        async def ready() -> None:
            # B's catalog read the server, and every policy of both meshes reached the messaging services.
            for agent_id in (shared.id, closed.id, kept.id):
                assert set(await tools_of(nb, agent_id)) == ALL
            events = await invoke(x, shared.id, "slow", steps=1)
            assert events[-1].result.structured_content["result"] == "counted to 1"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await invoke(x, shared.id, "add", a=1, b=1)
            assert "adding is closed" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await invoke(x, closed.id, "fail", why="x")
            assert "stay closed from here" in (refused.value.details() or "")

        await eventually(ready, 40)
        yield x


async def refused_by(x: Across, mesh: str, code: grpc.StatusCode, said: str, agent_id: str = "") -> None:
    """A call to `mesh` fails with `code` and says `said` (once this mesh's peer list has the peer just added)."""

    async def check() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await invoke(x, agent_id or x.open_id, "slow", mesh=mesh, steps=1)
        assert refused.value.code() == code, (mesh, refused.value.code(), refused.value.details())
        assert said in (refused.value.details() or ""), (mesh, refused.value.details())
        if code == grpc.StatusCode.UNAVAILABLE:
            assert reason(refused.value) == "TOOL_UNAVAILABLE"

    await eventually(check, 10)


# Discovery ---------------------------------------------------------------------------------------------------------


async def _discover(http: aiohttp.ClientSession, on: MeshHandle, **params: str) -> dict[str, Any]:
    async with http.get(
        on.url("/api/v1/discovery/agents"),
        headers=auth(on.admin_token),
        params={"include_federated": "true", "force_refresh": "true", **params},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return dict(body)


async def test_federated_search_finds_a_peers_tools_with_the_sharing_rules(
    across: Across, http: aiohttp.ClientSession
) -> None:
    found = await _discover(http, across.a.mesh, search=across.word, capability_kind="tool", capability_name="slow")
    by_name = {agent["name"]: agent for agent in found["agents"]}
    # The two registrations shared with peers, from mesh-b; the one kept local is not there.
    assert set(by_name) == {f"open {across.word}", f"closed {across.word}"}
    shared = by_name[f"open {across.word}"]
    assert shared["is_federated"] is True and shared["registry_name"] == "mesh-b"
    assert shared["id"] == across.open_id
    tools = {c["name"]: c for c in shared["capabilities"] if c["kind"] in ("CAPABILITY_KIND_TOOL", "tool")}
    assert set(tools) == ALL
    assert json.loads(tools["slow"]["input_schema"])["required"] == ["steps"]
    # The capability filter applies to peers' agents too.
    none = await _discover(http, across.a.mesh, search=across.word, capability_kind="tool", capability_name="nope")
    assert none["agents"] == []


# Invocation --------------------------------------------------------------------------------------------------------


async def test_a_peer_tool_streams_progress_then_its_result(across: Across) -> None:
    events = await invoke(across, across.open_id, "slow", steps=3)
    assert [e.WhichOneof("event") for e in events] == ["progress", "progress", "progress", "result"]
    assert [e.progress.progress for e in events[:3]] == [1, 2, 3]
    assert events[0].progress.total == 3 and events[0].progress.message == "step 1"
    assert events[-1].result.structured_content["result"] == "counted to 3"
    # The tool's own failure stays a tool error: a result, not a failed call.
    failed = await invoke(across, across.open_id, "fail", why="across")
    assert len(failed) == 1 and failed[0].result.is_error
    assert failed[0].result.content[0]["text"] == "Error executing tool fail"  # the server's text, relayed


async def test_the_peers_policy_refuses_with_its_reason(across: Across) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(across, across.open_id, "add", a=1, b=2)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(refused.value) == "TOOL_DENIED"
    assert "peer mesh mesh-b" in (refused.value.details() or "")
    assert "adding is closed to peer meshes" in (refused.value.details() or "")


async def test_this_meshs_policy_refuses_before_any_peer_call(across: Across, http: aiohttp.ClientSession) -> None:
    before = await seen(across.a.server)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(across, across.closed_id, "hang", timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and reason(refused.value) == "TOOL_DENIED"
    assert "stay closed from here" in (refused.value.details() or "")
    assert "peer mesh" not in (refused.value.details() or "")
    assert (await seen(across.a.server))["hang_started"] == before["hang_started"]
    # The same refusal towards a peer that cannot even be reached: decided here, nothing was sent.
    await add_peer(http, across.a.mesh, "mesh-gone", f"http://127.0.0.1:{free_port()}", "avf_0123456789abcdef_x")
    await refused_by(across, "mesh-gone", grpc.StatusCode.PERMISSION_DENIED, "stay closed from here", across.closed_id)


async def test_bad_arguments_are_refused_by_the_peer(across: Across) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(across, across.open_id, "slow", steps="many")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = set()
    for detail in rpc_status.from_call(refused.value).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    assert "arguments/steps" in fields
    assert "peer mesh mesh-b" in (refused.value.details() or "")


async def test_a_local_agent_or_unknown_tool_of_the_peer_is_not_found(across: Across) -> None:
    for agent_id, tool in ((across.local_id, "slow"), (across.open_id, "nope")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await invoke(across, agent_id, tool, steps=1)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(across, across.open_id, "slow", mesh="mesh-nowhere", steps=1)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and reason(refused.value) == "PEER_NOT_FOUND"


async def test_the_deadline_reaches_the_peers_tool(across: Across) -> None:
    before = await seen(across.a.server)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(across, across.open_id, "hang", timeout=2)
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def cancelled() -> None:
        now = await seen(across.a.server)
        assert now["hang_started"] > before["hang_started"]
        assert now["hang_cancelled"] > before["hang_cancelled"]

    await eventually(cancelled, 10)


async def test_cancelling_the_call_cancels_the_peers_tool(across: Across) -> None:
    before = await seen(across.a.server)
    call = across.a.tools.InvokeTool(
        tpb.InvokeToolRequest(agent_id=across.open_id, tool="hang", mesh="mesh-b"), metadata=across.md, timeout=120
    )

    async def started() -> None:
        assert (await seen(across.a.server))["hang_started"] > before["hang_started"]

    await eventually(started, 10)
    call.cancel()

    async def cancelled() -> None:
        assert (await seen(across.a.server))["hang_cancelled"] > before["hang_cancelled"]

    # Long before the call's own 120 s: the closed connection reached B's edge, which cancelled the tool.
    await eventually(cancelled, 10)


# The peer-facing endpoint ------------------------------------------------------------------------------------------


def _signed(token: str, body: str, *, key: str | None = None) -> dict[str, str]:
    nonce = signing.new_nonce()
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        signing.NONCE_HEADER: nonce,
        signing.SIGNATURE_HEADER: signing.sign("POST", PATH, body, key or token, nonce=nonce),
    }


async def _post(http: aiohttp.ClientSession, on: MeshHandle, headers: dict[str, str], body: str) -> tuple[int, str]:
    async with http.post(on.url(PATH), data=body.encode(), headers=headers) as resp:
        return resp.status, await resp.text()


def _reason_of(text: str) -> str:
    for detail in json.loads(text)["error"]["details"]:
        if detail["@type"].endswith("ErrorInfo"):
            return str(detail["reason"])
    return ""


async def test_the_peer_endpoint_checks_the_signature(across: Across, http: aiohttp.ClientSession) -> None:
    token_ = across.token_b_for_a
    body = json.dumps({"agent_id": across.open_id, "tool": "slow", "arguments": {"steps": 1}, "timeout_ms": 10000})
    status, text = await _post(http, across.b.mesh, _signed(token_, body), body)
    assert status == 200 and '"counted to 1"' in text, text
    status, text = await _post(http, across.b.mesh, _signed(token_, body, key=token_ + "x"), body)
    assert status == 401 and _reason_of(text) == "SIGNATURE_INVALID"
    unsigned = {"Authorization": f"Bearer {token_}", "Content-Type": "application/json"}
    status, text = await _post(http, across.b.mesh, unsigned, body)
    assert status == 401 and _reason_of(text) == "SIGNATURE_MISSING"
    status, text = await _post(http, across.b.mesh, _signed(across.b.mesh.admin_token, body), body)
    assert status == 403 and _reason_of(text) == "PEER_REQUIRED"
    # An agent B keeps to itself (local) is not found for a peer, signed or not.
    hidden = json.dumps({"agent_id": across.local_id, "tool": "slow", "arguments": {"steps": 1}})
    status, text = await _post(http, across.b.mesh, _signed(token_, hidden), hidden)
    assert status == 404 and _reason_of(text) == "AGENT_NOT_FOUND"


# Peers that are down or lie ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def liar() -> Iterator[str]:
    """A 'peer edge' on loopback whose base paths misbehave in one way each."""

    async def answer(request: web.Request) -> web.StreamResponse:
        kind = request.path.strip("/").split("/")[0]
        if kind == "notsse":
            return web.json_response({"result": {"is_error": False}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if kind == "badjson":
                await response.write(b'data: {"progress": oops\n\n')
            elif kind == "shape":
                await response.write(b'data: {"something": "else"}\n\n')
            elif kind == "noresult":
                await response.write(b'data: {"progress": {"progress": 1}}\n\n')
            elif kind == "huge":
                await response.write(b'data: {"progress": {"message": "')
                for _ in range(40):  # 10 MB, no end of event
                    await response.write(b"x" * 256 * 1024)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return response

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    port = free_port()
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def test_a_peer_that_is_down_or_lies_fails_only_that_call(
    across: Across, http: aiohttp.ClientSession, liar: str
) -> None:
    await add_peer(http, across.a.mesh, "mesh-down", f"http://127.0.0.1:{free_port()}", "avf_0123456789abcdef_x")
    lies = {
        "badjson": "not a JSON object",
        "shape": "not a tool event",
        "noresult": "ended without a result",
        "huge": "bytes",
        "notsse": "not an event stream",
    }
    for kind in lies:
        await add_peer(http, across.a.mesh, f"liar-{kind}", f"{liar}/{kind}", "avf_0123456789abcdef_x")
    await refused_by(across, "mesh-down", grpc.StatusCode.UNAVAILABLE, "cannot reach peer mesh mesh-down")
    for kind, said in lies.items():
        await refused_by(across, f"liar-{kind}", grpc.StatusCode.UNAVAILABLE, f"peer mesh liar-{kind} answered wrongly")
        await refused_by(across, f"liar-{kind}", grpc.StatusCode.UNAVAILABLE, said)
    # The service still serves: the real peer's tool answers.
    events = await invoke(across, across.open_id, "slow", steps=1)
    assert events[-1].result.structured_content["result"] == "counted to 1"
