"""The registry over real gRPC: CRUD, search, filters, pagination, auth and bad input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentvault.registry.v1 import registry_service_pb2 as pb

from ..conftest import MeshHandle, bearer, unique_did

if TYPE_CHECKING:
    from agentvault.registry.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub


def make_agent(**overrides: object) -> pb.Agent:
    fields: dict[str, object] = {
        "did": unique_did(),
        "name": "Summarizer",
        "description": "Summarizes long documents into short abstracts",
        "version": "1.0.0",
        "agent_type": "nlp",
        "tags": ["nlp", "text"],
        "capabilities": [
            pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name="summarize", version="1.4.2"),
            pb.Capability(kind=pb.CAPABILITY_KIND_MODEL, name="gpt-x", version="2.0.0"),
        ],
        "endpoints": [pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url="https://agents.example/summarizer")],
        "sharing": pb.SHARING_LOCAL,
    }
    fields.update(overrides)
    return pb.Agent(**fields)  # type: ignore[arg-type]


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None, "INVALID_ARGUMENT must carry google.rpc details"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


async def member_token(registry: RegistryServiceAsyncStub, admin_token: str, name: str) -> str:
    reply = await registry.CreateApiKey(pb.CreateApiKeyRequest(name=name), metadata=bearer(admin_token))
    assert reply.api_key.role == pb.ROLE_MEMBER
    return reply.token


async def test_create_get_update_delete(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    token = await member_token(registry, admin_token, "crud-owner")
    caller = await registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(token))
    created = await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(token))
    assert created.id and created.owner == caller.principal_id and caller.principal_id.startswith("prn_")
    assert created.create_time.seconds > 0 and created.sharing == pb.SHARING_LOCAL

    fetched = await registry.GetAgent(pb.GetAgentRequest(id=created.id))
    assert fetched == created

    patch = pb.Agent(id=created.id, description="Now also translates", tags=["nlp", "translation"])
    updated = await registry.UpdateAgent(
        pb.UpdateAgentRequest(agent=patch, update_mask=field_mask_pb2.FieldMask(paths=["description", "tags"])),
        metadata=bearer(token),
    )
    assert updated.description == "Now also translates"
    assert list(updated.tags) == ["nlp", "translation"]
    assert updated.name == created.name and len(updated.capabilities) == 2  # untouched by the mask
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()

    # An empty mask is a full replacement (PUT): fields not sent are cleared.
    replacement = make_agent(did=created.did, name="Renamed", capabilities=[], tags=[])
    replacement.id = created.id
    replaced = await registry.UpdateAgent(pb.UpdateAgentRequest(agent=replacement), metadata=bearer(token))
    assert replaced.name == "Renamed" and list(replaced.capabilities) == [] and list(replaced.tags) == []

    await registry.DeleteAgent(pb.DeleteAgentRequest(id=created.id), metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.GetAgent(pb.GetAgentRequest(id=created.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_duplicate_did_is_already_exists(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    agent = make_agent()
    await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=bearer(admin_token))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=bearer(admin_token))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert agent.did in (err.value.details() or "")


async def test_writes_need_a_credential(registry: RegistryServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in ("nonsense", "avk_0123456789abcdef_wrongsecret"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_only_owner_or_admin_may_change(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    alice = await member_token(registry, admin_token, "alice")
    bob = await member_token(registry, admin_token, "bob")
    agent = await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(alice))
    alice_id = (await registry.GetCaller(pb.GetCallerRequest(), metadata=bearer(alice))).principal_id
    mask = field_mask_pb2.FieldMask(paths=["name"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.UpdateAgent(
            pb.UpdateAgentRequest(agent=pb.Agent(id=agent.id, name="Hijacked"), update_mask=mask),
            metadata=bearer(bob),
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.DeleteAgent(pb.DeleteAgentRequest(id=agent.id), metadata=bearer(bob))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await registry.GetAgent(pb.GetAgentRequest(id=agent.id))).name == "Summarizer"

    by_admin = await registry.UpdateAgent(
        pb.UpdateAgentRequest(agent=pb.Agent(id=agent.id, name="Fixed by admin"), update_mask=mask),
        metadata=bearer(admin_token),
    )
    assert by_admin.name == "Fixed by admin" and by_admin.owner == alice_id


async def test_private_agents_are_hidden_from_others(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    carol = await member_token(registry, admin_token, "carol")
    dave = await member_token(registry, admin_token, "dave")
    private = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(sharing=pb.SHARING_PRIVATE, name="Carol secret")),
        metadata=bearer(carol),
    )
    carol_id = private.owner
    for md in ([], bearer(dave)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry.GetAgent(pb.GetAgentRequest(id=private.id), metadata=md)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await registry.ListAgents(pb.ListAgentsRequest(owner=carol_id, page_size=500), metadata=md)
        assert private.id not in {a.id for a in listed.agents}
    for md in (bearer(carol), bearer(admin_token)):
        assert (await registry.GetAgent(pb.GetAgentRequest(id=private.id), metadata=md)).name == "Carol secret"
        listed = await registry.ListAgents(pb.ListAgentsRequest(owner=carol_id, page_size=500), metadata=md)
        assert private.id in {a.id for a in listed.agents}


async def test_revoked_key_stops_working(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    reply = await registry.CreateApiKey(pb.CreateApiKeyRequest(name="temp"), metadata=bearer(admin_token))
    await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(reply.token))
    revoked = await registry.RevokeApiKey(pb.RevokeApiKeyRequest(id=reply.api_key.id), metadata=bearer(admin_token))
    assert revoked.revoke_time.seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(reply.token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    keys = await registry.ListApiKeys(pb.ListApiKeysRequest(page_size=500), metadata=bearer(admin_token))
    listed = {k.id: k for k in keys.api_keys}
    assert listed[reply.api_key.id].revoke_time.seconds > 0
    assert "token" not in str(keys)  # secrets are never listed


async def test_key_management_is_admin_only(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    member = await member_token(registry, admin_token, "erin")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateApiKey(pb.CreateApiKeyRequest(name="sneaky", role=pb.ROLE_ADMIN), metadata=bearer(member))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ListApiKeys(pb.ListApiKeysRequest(), metadata=bearer(member))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_api_keys_are_stored_hashed(
    mesh: MeshHandle, registry: RegistryServiceAsyncStub, admin_token: str
) -> None:
    reply = await registry.CreateApiKey(pb.CreateApiKeyRequest(name="hashcheck"), metadata=bearer(admin_token))
    secret = reply.token.split("_", 2)[2]  # avk_<id>_<secret>; the secret may itself contain "_"
    conn = await asyncpg.connect(mesh.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", reply.api_key.id)
    finally:
        await conn.close()
    assert row is not None
    assert all(secret not in str(value) and secret.encode() not in bytes(str(value), "utf8") for value in row.values())
    assert len(row["secret_hash"]) == 32


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"did": ""}, "agent.did"),
        ({"did": "not-a-did"}, "agent.did"),
        ({"name": ""}, "agent.name"),
        ({"name": "x" * 201}, "agent.name"),
        ({"name": "bad\x00name"}, "agent.name"),
        ({"version": "1.0"}, "agent.version"),
        ({"version": "latest"}, "agent.version"),
        ({"description": "d" * 5000}, "agent.description"),
        ({"agent_type": "Has Spaces"}, "agent.agent_type"),
        ({"tags": ["UPPER"]}, "agent.tags[0]"),
        ({"tags": [f"t{i}" for i in range(51)]}, "agent.tags"),
        ({"endpoints": [pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url="not a url")]}, "agent.endpoints[0].url"),
        ({"endpoints": [pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url="ftp://x.example/a")]}, "agent.endpoints[0].url"),
        ({"endpoints": [pb.Endpoint(url="https://x.example")]}, "agent.endpoints[0].protocol"),
        ({"capabilities": [pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="t", version="one")]},
         "agent.capabilities[0].version"),
        ({"capabilities": [pb.Capability(name="t")]}, "agent.capabilities[0].kind"),
        ({"capabilities": [pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="a"),
                           pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name="a")]}, "agent.capabilities[1].name"),
        ({"health_check_url": "javascript:alert(1)"}, "agent.health_check_url"),
        ({"sharing": 42}, "agent.sharing"),
    ],
)  # fmt: skip
async def test_bad_input_is_rejected_and_nothing_stored(
    registry: RegistryServiceAsyncStub, admin_token: str, change: dict[str, object], field: str
) -> None:
    agent = make_agent(**change)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=bearer(admin_token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(err.value), violations(err.value)
    if agent.did.startswith("did:web:"):
        listed = await registry.ListAgents(pb.ListAgentsRequest(page_size=500), metadata=bearer(admin_token))
        assert agent.did not in {a.did for a in listed.agents}


async def test_update_mask_rejects_output_only_and_unknown(
    registry: RegistryServiceAsyncStub, admin_token: str
) -> None:
    agent = await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(admin_token))
    for path in ("owner", "no_such_field"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await registry.UpdateAgent(
                pb.UpdateAgentRequest(agent=pb.Agent(id=agent.id), update_mask=field_mask_pb2.FieldMask(paths=[path])),
                metadata=bearer(admin_token),
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "update_mask" in violations(err.value)
    # A masked update that would leave the agent invalid is rejected, and the agent is unchanged.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.UpdateAgent(
            pb.UpdateAgentRequest(
                agent=pb.Agent(id=agent.id, version="bad"), update_mask=field_mask_pb2.FieldMask(paths=["version"])
            ),
            metadata=bearer(admin_token),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await registry.GetAgent(pb.GetAgentRequest(id=agent.id))).version == "1.0.0"


async def test_bad_ids_and_tokens(registry: RegistryServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.GetAgent(pb.GetAgentRequest(id="not-a-uuid"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ListAgents(pb.ListAgentsRequest(page_token="garbage!"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ListAgents(pb.ListAgentsRequest(page_size=-1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ListAgents(pb.ListAgentsRequest(capability_name="x", capability_version=">>1"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "capability_version" in violations(err.value)


async def test_pagination_walks_every_agent_once(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    tag = "page-" + unique_did()[-12:]
    created = set()
    for i in range(23):
        agent = await registry.CreateAgent(
            pb.CreateAgentRequest(agent=make_agent(name=f"Pager {i}", tags=[tag])), metadata=bearer(admin_token)
        )
        created.add(agent.id)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await registry.ListAgents(pb.ListAgentsRequest(tag=tag, page_size=5, page_token=token))
        seen.extend(a.id for a in page.agents)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 5 and len(seen) == 23 and set(seen) == created
    # The token is bound to its query: changing a filter mid-way is rejected.
    first = await registry.ListAgents(pb.ListAgentsRequest(tag=tag, page_size=5))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ListAgents(pb.ListAgentsRequest(tag="other", page_size=5, page_token=first.next_page_token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_search_ranks_and_filters(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    word = "zyxquant" + unique_did()[-6:].replace("-", "")
    strong = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(name=f"{word} analyst", agent_type="finance", tags=[word[:60]])),
        metadata=bearer(admin_token),
    )
    weak = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(name="Other", description=f"mentions {word} once", agent_type="nlp")),
        metadata=bearer(admin_token),
    )
    found = await registry.ListAgents(pb.ListAgentsRequest(search=word))
    assert [a.id for a in found.agents] == [strong.id, weak.id]  # name match outranks description
    prefix = await registry.ListAgents(pb.ListAgentsRequest(search=word[:10]))
    assert {strong.id, weak.id} <= {a.id for a in prefix.agents}
    typed = await registry.ListAgents(pb.ListAgentsRequest(search=word, agent_type="nlp"))
    assert [a.id for a in typed.agents] == [weak.id]
    nothing = await registry.ListAgents(pb.ListAgentsRequest(search=word + " absentword"))
    assert list(nothing.agents) == []
    punctuation = await registry.ListAgents(pb.ListAgentsRequest(search="&|!():*<>'"))
    assert list(punctuation.agents) == []


async def test_search_pagination_by_rank(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    word = "pagrank" + unique_did()[-6:].replace("-", "")
    ids = set()
    for i in range(7):
        description = " ".join([word] * (i + 1))
        agent = await registry.CreateAgent(
            pb.CreateAgentRequest(agent=make_agent(name=f"R{i}", description=description)), metadata=bearer(admin_token)
        )
        ids.add(agent.id)
    seen: list[str] = []
    token = ""
    while True:
        page = await registry.ListAgents(pb.ListAgentsRequest(search=word, page_size=3, page_token=token))
        seen.extend(a.id for a in page.agents)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 7 and set(seen) == ids


async def test_capability_version_constraints(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    cap = "translate-" + unique_did()[-8:]
    by_version = {}
    for version in ("1.1.0", "1.4.0", "1.9.3", "2.0.0", "2.0.0-rc.1"):
        agent = await registry.CreateAgent(
            pb.CreateAgentRequest(
                agent=make_agent(capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name=cap, version=version)])
            ),
            metadata=bearer(admin_token),
        )
        by_version[agent.id] = version
    unversioned = await registry.CreateAgent(
        pb.CreateAgentRequest(agent=make_agent(capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_TOOL, name=cap)])),
        metadata=bearer(admin_token),
    )

    async def versions_for(constraint: str, kind: int = pb.CAPABILITY_KIND_TOOL) -> set[str]:
        reply = await registry.ListAgents(
            pb.ListAgentsRequest(capability_name=cap, capability_kind=kind, capability_version=constraint)  # type: ignore[arg-type]
        )
        return {by_version.get(a.id, "unversioned") for a in reply.agents}

    assert await versions_for(">=1.2,<2") == {"1.4.0", "1.9.3"}
    assert await versions_for("^1.4") == {"1.4.0", "1.9.3"}
    assert await versions_for("~1.1") == {"1.1.0"}
    assert await versions_for(">=2.0.0-rc.1") == {"2.0.0", "2.0.0-rc.1"}
    assert await versions_for("^1.4", pb.CAPABILITY_KIND_SKILL) == set()
    every = await registry.ListAgents(pb.ListAgentsRequest(capability_name=cap))
    assert unversioned.id in {a.id for a in every.agents} and len(every.agents) == 6


async def test_health_counts_agents(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    before = await registry.GetHealth(pb.GetHealthRequest())
    assert before.status == pb.HEALTH_STATUS_HEALTHY
    await registry.CreateAgent(pb.CreateAgentRequest(agent=make_agent()), metadata=bearer(admin_token))
    after = await registry.GetHealth(pb.GetHealthRequest())
    assert after.agent_count == before.agent_count + 1


async def test_enum_fields_map_through_the_shared_words(registry: RegistryServiceAsyncStub, admin_token: str) -> None:
    """The registry's enums go through agentvault.common.enums: every value round-trips, a number this build does
    not know is a field violation, and a required enum left at zero "is required"."""
    admin = bearer(admin_token)
    agent = make_agent(
        sharing=pb.SHARING_FEDERATED,
        capabilities=[
            pb.Capability(kind=kind, name=f"c{kind}", version="1.0.0")
            for kind in (pb.CAPABILITY_KIND_TOOL, pb.CAPABILITY_KIND_SKILL, pb.CAPABILITY_KIND_MODEL)
        ],
        endpoints=[pb.Endpoint(protocol=p, url=f"https://x.example/{p}") for p in (pb.PROTOCOL_HTTP, pb.PROTOCOL_A2A)],
    )
    created = await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=admin)
    assert [c.kind for c in created.capabilities] == [c.kind for c in agent.capabilities]
    assert [e.protocol for e in created.endpoints] == [e.protocol for e in agent.endpoints]
    assert created.sharing == pb.SHARING_FEDERATED and created.health_status == pb.HEALTH_STATUS_UNKNOWN
    reported = await registry.ReportAgentHealth(
        pb.ReportAgentHealthRequest(id=created.id, health_status=pb.HEALTH_STATUS_DEGRADED), metadata=admin
    )
    assert reported.health_status == pb.HEALTH_STATUS_DEGRADED
    assert (await registry.GetCaller(pb.GetCallerRequest(), metadata=admin)).role == pb.ROLE_ADMIN
    member = await registry.CreateApiKey(pb.CreateApiKeyRequest(name="enum-member"), metadata=admin)
    assert member.api_key.role == pb.ROLE_MEMBER  # role left at zero: a member

    bad_kind = make_agent(capabilities=[pb.Capability(kind=99, name="c", version="1.0.0")])  # type: ignore[arg-type]
    calls = [
        (registry.CreateAgent(pb.CreateAgentRequest(agent=bad_kind), metadata=admin), "agent.capabilities[0].kind"),
        (registry.ListAgents(pb.ListAgentsRequest(sharing=99)), "sharing"),  # type: ignore[arg-type]
        (registry.ListAgents(pb.ListAgentsRequest(capability_kind=99)), "capability_kind"),  # type: ignore[arg-type]
        (
            registry.ReportAgentHealth(
                pb.ReportAgentHealthRequest(id=created.id, health_status=99),  # type: ignore[arg-type]
                metadata=admin,
            ),
            "health_status",
        ),
        (registry.CreateApiKey(pb.CreateApiKeyRequest(name="x", role=99), metadata=admin), "role"),  # type: ignore[arg-type]
    ]
    for call, field in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == {field: "unknown value 99"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await registry.ReportAgentHealth(pb.ReportAgentHealthRequest(id=created.id), metadata=admin)
    assert violations(err.value) == {"health_status": "is required"}
