"""Ownership is a stable principal id: keys that share a name, or are named like the admin, own nothing of each
other's, on every route that checks ownership (through the real HTTP edge, as the defect was reproduced)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from ..conftest import MeshHandle, auth, unique_did
from .test_agents_http import seed_agent

BOOTSTRAP_PRINCIPAL_ID = "prn_bootstrap_admin"


async def issue_key(http: aiohttp.ClientSession, mesh: MeshHandle, name: str, **extra: Any) -> dict[str, Any]:
    async with http.post(
        mesh.url("/api/v1/api-keys"), json={"name": name, **extra}, headers=auth(mesh.admin_token)
    ) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def create(http: aiohttp.ClientSession, mesh: MeshHandle, token: str, sharing: str) -> dict[str, Any]:
    body = seed_agent(did=unique_did("own"), name=f"{sharing} agent", sharing=sharing)
    async with http.post(mesh.url("/api/v1/agents"), json=body, headers=auth(token)) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def statuses(http: aiohttp.ClientSession, mesh: MeshHandle, token: str, agent_id: str) -> dict[str, int]:
    """What `token` gets from every route that checks ownership of `agent_id` (the delete comes last)."""
    url = mesh.url(f"/api/v1/agents/{agent_id}")
    seen: dict[str, int] = {}
    async with http.get(url, headers=auth(token)) as r:
        seen["get"] = r.status
    async with http.patch(url, json={"name": "Hijacked"}, headers=auth(token)) as r:
        seen["patch"] = r.status
    put_body = seed_agent(did=unique_did("put"), name="Replaced", sharing="local")
    async with http.put(url, json=put_body, headers=auth(token)) as r:
        seen["put"] = r.status
    async with http.get(mesh.url("/api/v1/agents"), params={"page_size": "500"}, headers=auth(token)) as r:
        assert r.status == 200
        seen["listed"] = int(agent_id in {a["id"] for a in (await r.json())["agents"]})
    async with http.delete(url, headers=auth(token)) as r:
        seen["delete"] = r.status
    return seen


@pytest.fixture(scope="module")
async def keys(http: aiohttp.ClientSession, mesh: MeshHandle) -> dict[str, dict[str, Any]]:
    first = await issue_key(http, mesh, "member-one")
    return {
        "first": first,
        # The two impostors of the defect: the same name as member 1, and the bootstrap admin's name.
        "same_name": await issue_key(http, mesh, "member-one"),
        "named_admin": await issue_key(http, mesh, "admin"),
    }


async def test_keys_of_one_name_are_distinct_principals(keys: dict[str, dict[str, Any]]) -> None:
    ids = {k["api_key"]["principal_id"] for k in keys.values()}
    assert len(ids) == 3 and all(i.startswith("prn_") for i in ids)
    assert BOOTSTRAP_PRINCIPAL_ID not in ids


@pytest.mark.parametrize("impostor", ["same_name", "named_admin"])
async def test_impostor_cannot_touch_a_members_agents(
    http: aiohttp.ClientSession, mesh: MeshHandle, keys: dict[str, dict[str, Any]], impostor: str
) -> None:
    owner, other = keys["first"]["token"], keys[impostor]["token"]
    private = await create(http, mesh, owner, "private")
    local = await create(http, mesh, owner, "local")
    # A private agent does not exist for anyone but its owner and admins; a visible one cannot be changed.
    assert await statuses(http, mesh, other, private["id"]) == {
        "get": 404, "patch": 404, "put": 404, "listed": 0, "delete": 404
    }  # fmt: skip
    assert await statuses(http, mesh, other, local["id"]) == {
        "get": 200, "patch": 403, "put": 403, "listed": 1, "delete": 403
    }  # fmt: skip
    # The owner still can, on both.
    for agent in (private, local):
        assert await statuses(http, mesh, owner, agent["id"]) == {
            "get": 200, "patch": 200, "put": 200, "listed": 1, "delete": 200
        }  # fmt: skip


async def test_a_key_named_admin_is_not_the_admin(
    http: aiohttp.ClientSession, mesh: MeshHandle, keys: dict[str, dict[str, Any]]
) -> None:
    private = await create(http, mesh, mesh.admin_token, "private")
    assert private["owner"] == BOOTSTRAP_PRINCIPAL_ID
    assert await statuses(http, mesh, keys["named_admin"]["token"], private["id"]) == {
        "get": 404, "patch": 404, "put": 404, "listed": 0, "delete": 404
    }  # fmt: skip
    # Filtering by the admin's principal id shows the impostor none of the admin's private agents either.
    async with http.get(
        mesh.url("/api/v1/agents"),
        params={"owner": BOOTSTRAP_PRINCIPAL_ID, "page_size": "500"},
        headers=auth(keys["named_admin"]["token"]),
    ) as r:
        assert private["id"] not in {a["id"] for a in (await r.json())["agents"]}
    # Nor does the name grant admin rights.
    async with http.get(mesh.url("/api/v1/api-keys"), headers=auth(keys["named_admin"]["token"])) as r:
        assert r.status == 403


async def test_another_key_for_the_same_principal_owns_its_agents(
    http: aiohttp.ClientSession, mesh: MeshHandle
) -> None:
    first = await issue_key(http, mesh, "to-rotate")
    private = await create(http, mesh, first["token"], "private")
    rotated = await issue_key(http, mesh, "rotated", principal_id=first["api_key"]["principal_id"])
    assert rotated["api_key"]["principal_id"] == first["api_key"]["principal_id"]
    async with http.post(mesh.url(f"/api/v1/api-keys/{first['api_key']['id']}:revoke"), json={}, headers=auth(
        mesh.admin_token
    )) as r:  # fmt: skip
        assert r.status == 200
    assert await statuses(http, mesh, rotated["token"], private["id"]) == {
        "get": 200, "patch": 200, "put": 200, "listed": 1, "delete": 200
    }  # fmt: skip


@pytest.mark.parametrize(
    ("principal_id", "status", "reason"),
    [
        (BOOTSTRAP_PRINCIPAL_ID, 400, "INVALID_ARGUMENT"),
        ("prn_" + "0" * 32, 404, "PRINCIPAL_NOT_FOUND"),
        ("admin", 400, "INVALID_ARGUMENT"),
    ],
)
async def test_no_key_can_be_issued_for_the_admin_or_a_made_up_principal(
    http: aiohttp.ClientSession, mesh: MeshHandle, principal_id: str, status: int, reason: str
) -> None:
    async with http.post(
        mesh.url("/api/v1/api-keys"),
        json={"name": "sneaky", "principal_id": principal_id},
        headers=auth(mesh.admin_token),
    ) as r:
        assert r.status == status, await r.text()
        assert reason in await r.text()


async def health_count(http: aiohttp.ClientSession, mesh: MeshHandle, token: str | None) -> int:
    async with http.get(mesh.url("/api/v1/health"), headers=auth(token) if token else {}) as r:
        assert r.status == 200, await r.text()
        return int((await r.json())["agent_count"])


async def test_health_counts_only_what_the_caller_may_see(
    http: aiohttp.ClientSession, mesh: MeshHandle, keys: dict[str, dict[str, Any]]
) -> None:
    owner, other = keys["first"]["token"], keys["same_name"]["token"]
    # A peer is counted with the federation token this mesh issued it (the seed's health check sends it).
    async with http.post(
        mesh.url("/api/v1/federation/credentials"), json={"name": "health-peer"}, headers=auth(mesh.admin_token)
    ) as r:
        assert r.status == 200, await r.text()
        peer = (await r.json())["token"]
    viewers = {"anonymous": None, "owner": owner, "other": other, "admin": mesh.admin_token, "peer": peer}

    async def counts() -> dict[str, int]:
        return {name: await health_count(http, mesh, token) for name, token in viewers.items()}

    before = await counts()
    await create(http, mesh, owner, "private")
    after_private = await counts()
    assert {k: after_private[k] - before[k] for k in viewers} == {
        "anonymous": 0, "owner": 1, "other": 0, "admin": 1, "peer": 0
    }  # fmt: skip
    await create(http, mesh, owner, "local")
    after_local = await counts()
    assert {k: after_local[k] - after_private[k] for k in viewers} == {
        "anonymous": 1, "owner": 1, "other": 1, "admin": 1, "peer": 0
    }  # fmt: skip
    await create(http, mesh, owner, "federated")
    after_federated = await counts()
    assert {k: after_federated[k] - after_local[k] for k in viewers} == {
        "anonymous": 1, "owner": 1, "other": 1, "admin": 1, "peer": 1
    }  # fmt: skip
