"""The authorization server's signing keys: rotation with overlap, encryption at rest, off without a key box."""

from __future__ import annotations

import json

import asyncpg
import grpc
import jwt as pyjwt
import pytest

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.mesh import SERVICES
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc

from ..conftest import MeshFactory, bearer, eventually
from .oauth_helpers import basic, create_client, token, verify


async def test_rotation_keeps_old_tokens_verifiable(mesh_factory: MeshFactory) -> None:
    handle = mesh_factory(
        services=SERVICES[:1],
        name="oauthkeys",
        env={"OAUTH_KEY_ROTATION_SECONDS": "2", "OAUTH_ACCESS_TOKEN_TTL": "60"},
    )
    async with grpc.aio.insecure_channel(handle.address("registry")) as channel:
        stub = ipb_grpc.IdentityServiceStub(channel)
        # Before any token was signed the set already holds the key that will sign the first one.
        assert len(json.loads((await stub.GetJwks(ipb.GetJwksRequest())).json)["keys"]) == 1
        created = await create_client(stub, handle.admin_token)
        auth = basic(created.client.client_id, created.client_secret)
        form = {"grant_type": "client_credentials"}
        first = (await token(stub, form, auth)).body["access_token"]
        first_kid = pyjwt.get_unverified_header(first)["kid"]
        later: list[str] = []

        async def rotated() -> None:
            later.append((await token(stub, form, auth)).body["access_token"])
            assert pyjwt.get_unverified_header(later[-1])["kid"] != first_kid

        await eventually(rotated, seconds=15)
        # The token signed before the rotation still verifies against the published set, next to the new one.
        assert (await verify(stub, first))["client_id"] == created.client.client_id
        assert (await verify(stub, later[-1]))["client_id"] == created.client.client_id
        kids = {k["kid"] for k in json.loads((await stub.GetJwks(ipb.GetJwksRequest())).json)["keys"]}
        assert {first_kid, pyjwt.get_unverified_header(later[-1])["kid"]} <= kids

    # At rest the private halves are encrypted with the mesh's FEDERATION_ENCRYPTION_KEYS.
    conn = await asyncpg.connect(handle.database_url)
    try:
        rows = await conn.fetch("SELECT kid, private_jwk_encrypted, public_jwk::text AS public FROM oauth_signing_keys")
    finally:
        await conn.close()
    box = SecretBox([handle.mesh.env["FEDERATION_ENCRYPTION_KEYS"]])
    assert len(rows) >= 2
    for row in rows:
        stored = bytes(row["private_jwk_encrypted"]).decode()
        assert '"d"' not in stored and '"d"' not in row["public"]
        assert json.loads(box.decrypt(stored))["d"]


async def test_without_an_encryption_key_the_server_is_off(mesh_factory: MeshFactory) -> None:
    handle = mesh_factory(services=SERVICES[:1], name="oauthoff", env={"FEDERATION_ENCRYPTION_KEYS": ""})
    async with grpc.aio.insecure_channel(handle.address("registry")) as channel:
        stub = ipb_grpc.IdentityServiceStub(channel)
        answer = await token(stub, {"grant_type": "client_credentials"}, basic("avc_x", "y"))
        assert answer.status == 503 and "FEDERATION_ENCRYPTION_KEYS" in answer.body["error_description"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create_client(stub, handle.admin_token)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "FEDERATION_ENCRYPTION_KEYS" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetJwks(ipb.GetJwksRequest(), metadata=bearer(handle.admin_token))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    log = (handle.mesh.log_dir / "registry.log").read_text()  # type: ignore[operator]
    assert "authorization server is off" in log
