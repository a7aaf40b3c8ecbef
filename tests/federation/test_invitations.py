"""The invitation handshake between two real meshes: B invites, A redeems through its edge with the seed's body plus
the code, and both directions work with tokens neither admin ever saw; bad, expired, reused and forged codes are
refused without burning anything, and of racing redemptions exactly one wins."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.common import invitations as hs
from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import free_port
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.federation.v1 import federation_service_pb2_grpc as fpb_grpc

from ..client.conftest import CLI
from ..conftest import MeshFactory, MeshHandle, eventually
from .conftest import admin, call, discover, mesh_env, register, unique_word

RATE_LIMIT = 100


def public_mesh_env(name: str, **extra: str) -> dict[str, str]:
    """A mesh whose FEDERATION_PUBLIC_URL is its own edge (the port chosen before it starts)."""
    port = free_port()
    return mesh_env(name, EDGE_PORT=str(port), FEDERATION_PUBLIC_URL=f"http://127.0.0.1:{port}", **extra)


@dataclass
class Pair:
    a: MeshHandle
    b: MeshHandle
    # The code the first test tampered with, which the second then redeems (a refused forgery burns nothing).
    code: str = ""


@pytest.fixture(scope="module")
def pair(mesh_factory: MeshFactory) -> Pair:
    return Pair(
        a=mesh_factory(env=public_mesh_env("mesh-inv-a"), name="inv_a"),
        b=mesh_factory(
            env=public_mesh_env("mesh-inv-b", FEDERATION_INVITATION_RATE_LIMIT_PER_MINUTE=str(RATE_LIMIT)),
            name="inv_b",
        ),
    )


@pytest.fixture
async def b_api(pair: Pair) -> AsyncIterator[fpb_grpc.FederationServiceAsyncStub]:
    async with grpc.aio.insecure_channel(pair.b.address("registry")) as channel:
        yield fpb_grpc.FederationServiceStub(channel)


async def invite(http: aiohttp.ClientSession, b: MeshHandle, name: str = "mesh-inv-a", **fields: Any) -> str:
    body = await call(
        http, "POST", b.url("/api/v1/federation/invitations"), headers=admin(b), json={"name": name, **fields}
    )
    assert body["invitation"]["name"] == name and body["invitation"].get("redeem_time") is None
    code = body["code"]
    assert isinstance(code, str) and code.startswith("avi_") and "avf_" not in json.dumps(body)
    return code


async def join(http: aiohttp.ClientSession, a: MeshHandle, body: dict[str, Any], expect: int) -> Any:
    return await call(http, "POST", a.url("/api/v1/federation/peers"), headers=admin(a), json=body, expect=expect)


def reason(body: Any) -> tuple[str, dict[str, str]]:
    info = next(d for d in body["error"]["details"] if "reason" in d)
    return info["reason"], info.get("metadata", {})


def tamper(code: str) -> str:
    """The same code with one bit of its one-time secret flipped."""
    doc = json.loads(base64.urlsafe_b64decode(code[4:] + "=" * (-len(code[4:]) % 4)))
    secret = bytearray(base64.urlsafe_b64decode(doc["s"] + "=" * (-len(doc["s"]) % 4)))
    secret[0] ^= 1
    doc["s"] = base64.urlsafe_b64encode(bytes(secret)).rstrip(b"=").decode()
    return "avi_" + base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def redemption(code: str, url: str = "") -> fpb.RedeemFederationInvitationRequest:
    """What a redeeming mesh sends for `code`, built here the way the registry builds it."""
    parsed = hs.decode_code(code)
    _, public = hs.new_key_pair()
    cred = hs.new_credential_id()
    transcript = hs.transcript(parsed.invitation_id, parsed.public_key, public, parsed.registry_url, url, cred)
    return fpb.RedeemFederationInvitationRequest(
        invitation_id=parsed.invitation_id,
        public_key=public,
        registry_url=url,
        credential_id=cred,
        proof=hs.proof(parsed.secret, transcript),
    )


async def rows(handle: MeshHandle, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(handle.database_url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_malformed_forged_and_expired_codes_are_refused_and_burn_nothing(
    pair: Pair, http: aiohttp.ClientSession, b_api: fpb_grpc.FederationServiceAsyncStub
) -> None:
    a, b = pair.a, pair.b
    for bad in ("avi_garbage", "not a code", "avi_" + base64.urlsafe_b64encode(b'{"v":1}').decode()):
        body = await join(http, a, {"name": "Partner B", "invitation": bad}, 400)
        fields = [v["field"] for d in body["error"]["details"] for v in d.get("field_violations", [])]
        assert fields == ["peer.invitation"], body

    code = await invite(http, b)
    # An invitation replaces the api_key; the two together are refused, as is another URL than the code's.
    body = await join(http, a, {"name": "Partner B", "invitation": code, "api_key": "avf_x_y"}, 400)
    assert "peer.api_key" in json.dumps(body)
    body = await join(http, a, {"name": "Partner B", "invitation": code, "registry_url": "https://other.example"}, 400)
    assert "peer.registry_url" in json.dumps(body)

    # A mesh cannot peer with itself: A refuses its own code, B a redeemer claiming B's own URL.
    body = await join(http, a, {"name": "Myself", "invitation": await invite(http, a, name="myself")}, 400)
    assert "peer.invitation" in json.dumps(body)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await b_api.RedeemFederationInvitation(redemption(code, url=b.url()), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "own URL" in str(caught.value.details())
    # One bit of the secret flipped: B refuses the proof, and nothing is burnt (the true code works afterwards).
    body = await join(http, a, {"name": "Partner B", "invitation": tamper(code)}, 400)
    assert reason(body) == ("INVITATION_REFUSED", {"inviter_reason": "INVITATION_INVALID"}), body
    # A code for an invitation B never issued is refused the same way.
    forged = hs.InvitationCode(b.url(), "0b4e28ba-2fa1-11d2-883f-0016d3cca427", b"\x09" * 32, b"\x01" * 32).encode()
    body = await join(http, a, {"name": "Partner B", "invitation": forged}, 400)
    assert reason(body)[1] == {"inviter_reason": "INVITATION_INVALID"}, body

    expiring = await invite(http, b, ttl_seconds=1)
    listed = await call(http, "GET", b.url("/api/v1/federation/invitations"), headers=admin(b))
    expiry = next(i["expire_time"] for i in listed["invitations"] if i["id"] == hs.decode_code(expiring).invitation_id)
    while time.time() <= _epoch(expiry):
        await asyncio.sleep(0.1)
    body = await join(http, a, {"name": "Partner B", "invitation": expiring}, 400)
    assert reason(body) == ("INVITATION_REFUSED", {"inviter_reason": "INVITATION_EXPIRED"}), body
    assert (await call(http, "GET", a.url("/api/v1/federation/peers"), headers=admin(a))).get("peers", []) == []
    assert await rows(b, "SELECT id FROM federation_invitations WHERE redeemed_at IS NOT NULL") == []
    pair.code = code


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_redeemed_invitation_links_both_directions_without_a_token_in_sight(
    pair: Pair, http: aiohttp.ClientSession
) -> None:
    a, b = pair.a, pair.b
    code = pair.code or await invite(http, b)
    # The seed's body plus the invitation; registry_url may be given when it is the code's.
    peer = await join(http, a, {"name": "Partner B", "registry_url": b.url(), "invitation": code}, 200)
    assert peer["registry_url"] == b.url() and "api_key" not in peer and "invitation" not in peer

    # No token was ever shown: not in any answer an admin can get on either side.
    for handle in (a, b):
        for path in ("/api/v1/federation/peers", "/api/v1/federation/credentials", "/api/v1/federation/invitations"):
            assert "avf_" not in json.dumps(await call(http, "GET", handle.url(path), headers=admin(handle)))
    listed = await call(http, "GET", b.url("/api/v1/federation/invitations"), headers=admin(b))
    invitation = next(i for i in listed["invitations"] if i["id"] == hs.decode_code(code).invitation_id)
    assert invitation["redeemed_by"] == a.url() and invitation["credential_id"]

    # Both sides derived the same two tokens: A's key for B is B's credential for A, and the other way round. The
    # databases hold them only encrypted, and B has erased the invitation's private key.
    box_a, box_b = SecretBox([a.env["FEDERATION_ENCRYPTION_KEYS"]]), SecretBox([b.env["FEDERATION_ENCRYPTION_KEYS"]])
    (a_peer,) = await rows(a, "SELECT registry_url, api_key FROM federation_peers")
    (b_peer,) = await rows(b, "SELECT registry_url, api_key FROM federation_peers")
    (a_cred,) = await rows(a, "SELECT id, token_encrypted FROM federation_credentials")
    (b_cred,) = await rows(b, "SELECT id, token_encrypted FROM federation_credentials")
    token_ab, token_ba = box_a.decrypt(a_peer["api_key"]), box_b.decrypt(b_peer["api_key"])
    assert token_ab == box_b.decrypt(b_cred["token_encrypted"]) and token_ab.startswith(f"avf_{b_cred['id']}_")
    assert token_ba == box_a.decrypt(a_cred["token_encrypted"]) and token_ba.startswith(f"avf_{a_cred['id']}_")
    assert token_ab != token_ba and b_peer["registry_url"] == a.url()
    for handle in (a, b):
        dump = await rows(
            handle,
            """SELECT (SELECT coalesce(string_agg(t::text, '|'), '') FROM federation_peers t)
                   || (SELECT coalesce(string_agg(t::text, '|'), '') FROM federation_credentials t)
                   || (SELECT coalesce(string_agg(t::text, '|'), '') FROM federation_invitations t) AS all_rows""",
        )
        text = dump[0]["all_rows"]
        assert token_ab not in text and token_ba not in text and "avf_" not in text
    redeemed = await rows(b, "SELECT private_key_encrypted FROM federation_invitations WHERE redeemed_at IS NOT NULL")
    assert [r["private_key_encrypted"] for r in redeemed] == [None]

    # A finds B's federated agents, and B finds A's.
    word = unique_word()
    await register(http, b, f"{word} on b", "federated")
    await register(http, a, f"{word} on a", "federated")

    async def finds(on: MeshHandle, name: str) -> None:
        found = await discover(http, on, include_federated=True, search=word, force_refresh=True)
        assert [x["name"] for x in found["agents"] if x["is_federated"]] == [name], found["federation_stats"]

    await eventually(lambda: finds(a, f"{word} on b"), seconds=15)
    await eventually(lambda: finds(b, f"{word} on a"), seconds=15)

    # A forgets B: the credential A's handshake issued to B is revoked with it, and B no longer finds A's agents
    # (while A's other credentials, and B's for A, are untouched).
    await call(http, "DELETE", a.url(f"/api/v1/federation/peers/{peer['id']}"), headers=admin(a))
    (revoked,) = await rows(a, "SELECT id, revoked_at FROM federation_credentials")
    assert revoked["id"] == a_cred["id"] and revoked["revoked_at"] is not None
    (kept,) = await rows(b, "SELECT revoked_at FROM federation_credentials")
    assert kept["revoked_at"] is None

    async def finds_nothing(on: MeshHandle) -> None:
        found = await discover(http, on, include_federated=True, search=word, force_refresh=True)
        assert [x["name"] for x in found["agents"] if x["is_federated"]] == [], found["federation_stats"]

    await eventually(lambda: finds_nothing(b), seconds=15)

    # The same code a second time: refused by B, even once A has forgotten B.
    body = await join(http, a, {"name": "Partner B", "invitation": code}, 400)
    assert reason(body) == ("INVITATION_REFUSED", {"inviter_reason": "INVITATION_REDEEMED"}), body


async def test_of_racing_redemptions_exactly_one_wins(
    pair: Pair, http: aiohttp.ClientSession, b_api: fpb_grpc.FederationServiceAsyncStub
) -> None:
    for _ in range(4):
        code = await invite(http, pair.b, name="racer")
        attempts = [redemption(code) for _ in range(4)]
        results = await asyncio.gather(
            *(b_api.RedeemFederationInvitation(r, timeout=10) for r in attempts), return_exceptions=True
        )
        won = [r for r in results if isinstance(r, fpb.RedeemFederationInvitationResponse)]
        lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(won) == 1 and len(lost) == 3, results
        assert {e.code() for e in lost} == {grpc.StatusCode.FAILED_PRECONDITION}, lost
        assert hs.is_credential_id(won[0].credential_id) and not won[0].peer_created
        # The winner's credential exists at B; the losers created nothing.
        creds = await rows(pair.b, "SELECT id FROM federation_credentials WHERE name = 'racer'")
        assert won[0].credential_id in {c["id"] for c in creds}
    assert len(await rows(pair.b, "SELECT id FROM federation_credentials WHERE name = 'racer'")) == 4


def run_cli(on: MeshHandle, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    variables = {"REGISTRY_ADDR": on.address("registry"), "AGENTVAULT_TOKEN": on.admin_token}
    environ = {k: v for k, v in os.environ.items() if k not in variables} | variables
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=environ, timeout=60)


def cli_ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else {}


async def test_the_cli_invites_lists_revokes_and_joins(pair: Pair) -> None:
    """The two commands of the README: `federation invitations create` on B, `federation peers add --invitation` on
    A (the code read from stdin); a revoked invitation's code is refused. Runs in a thread: the CLI is a process."""
    a, b = pair.a, pair.b

    def scenario() -> None:
        revoked = cli_ok(run_cli(b, "federation", "invitations", "create", "mesh-inv-a", "--ttl", "600"))
        revoked_id = revoked["invitation"]["id"]
        listed = cli_ok(run_cli(b, "federation", "invitations", "list"))
        assert revoked_id in [i["id"] for i in listed["invitations"]] and revoked["code"] not in json.dumps(listed)
        assert cli_ok(run_cli(b, "federation", "invitations", "delete", revoked_id)) == {}
        refused = run_cli(a, "federation", "peers", "add", "--name", "B", "--invitation", "-", stdin=revoked["code"])
        assert refused.returncode == 1 and "INVITATION_REFUSED" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr

        # Earlier tests left B with A as a peer and A without B: B forgets A, then A joins again from the CLI.
        for handle in (a, b):
            for peer in cli_ok(run_cli(handle, "federation", "peers", "list")).get("peers", []):
                cli_ok(run_cli(handle, "federation", "peers", "delete", peer["id"]))
        code = cli_ok(run_cli(b, "federation", "invitations", "create", "mesh-inv-a"))["code"]
        joined = cli_ok(
            run_cli(a, "federation", "peers", "add", "--name", "B via CLI", "--invitation", "-", stdin=code)
        )
        assert joined["registry_url"] == b.url() and "avf_" not in json.dumps(joined)
        assert [p["registry_url"] for p in cli_ok(run_cli(b, "federation", "peers", "list"))["peers"]] == [a.url()]
        usage = run_cli(a, "federation", "peers", "add", "--name", "x", "--invitation", code, "--api-key", "k")
        assert usage.returncode == 2 and "exclude each other" in usage.stderr

    await asyncio.to_thread(scenario)


class LyingInviter(fpb_grpc.FederationServiceServicer):
    """A 'mesh' that answers redemptions with whatever `answer` is: the redeeming mesh must trust none of it."""

    def __init__(self) -> None:
        self.answer: fpb.RedeemFederationInvitationResponse | None = None
        self.calls = 0

    async def RedeemFederationInvitation(
        self, request: fpb.RedeemFederationInvitationRequest, context: grpc.aio.ServicerContext
    ) -> fpb.RedeemFederationInvitationResponse:
        self.calls += 1
        if self.answer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "\x1b[31mred\x00" + "x" * 5000)
        return self.answer


@pytest.fixture
async def liar() -> AsyncIterator[tuple[LyingInviter, str]]:
    from aiohttp import web

    servicer = LyingInviter()
    server = grpc.aio.server()
    fpb_grpc.add_FederationServiceServicer_to_server(servicer, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def document(request: web.Request) -> web.Response:
        info = {"registry_name": "liar", "protocol": "agentvault-grpc/v1", "grpc_endpoint": f"127.0.0.1:{grpc_port}"}
        return web.json_response(info)

    app = web.Application()
    app.router.add_get("/.well-known/agentvault-federation", document)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    http_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    try:
        yield servicer, f"http://127.0.0.1:{http_port}"
    finally:
        await runner.cleanup()
        await server.stop(None)


async def test_what_the_inviting_mesh_answers_is_checked_before_anything_is_stored(
    pair: Pair, http: aiohttp.ClientSession, liar: tuple[LyingInviter, str]
) -> None:
    servicer, url = liar
    _, inviter_key = hs.new_key_pair()
    code = hs.InvitationCode(url, "1b4e28ba-2fa1-11d2-883f-0016d3cca427", inviter_key, hs.new_secret()).encode()
    cases: list[tuple[fpb.RedeemFederationInvitationResponse | None, int, str]] = [
        # Keys it did not derive: the key confirmation fails.
        (fpb.RedeemFederationInvitationResponse(credential_id="0" * 16, confirmation=b"\x00" * 32), 400, "confirm"),
        (fpb.RedeemFederationInvitationResponse(credential_id="../../x", confirmation=b"\x00" * 32), 400, "malformed"),
        # An answer far larger than a handshake's is refused by gRPC before it is parsed.
        (fpb.RedeemFederationInvitationResponse(credential_id="0" * 16, registry_name="n" * 100_000), 503, "did not"),
        # A refusal whose text is long and full of control characters reaches A's admin bounded and printable.
        (None, 400, "refused"),
    ]
    for answer, status, words in cases:
        servicer.answer = answer
        body = await join(http, pair.a, {"name": "Liar", "invitation": code}, status)
        message = body["error"]["message"]
        assert words in message and len(message) < 500 and all(" " <= ch <= "~" for ch in message), body
    assert servicer.calls == len(cases)
    peers = await call(http, "GET", pair.a.url("/api/v1/federation/peers"), headers=admin(pair.a))
    assert url not in json.dumps(peers)
    assert await rows(pair.a, "SELECT id FROM federation_credentials WHERE name = 'Liar'") == []


async def test_redeem_over_rest_needs_no_credential_checks_its_input_and_is_rate_limited(
    pair: Pair, http: aiohttp.ClientSession, b_api: fpb_grpc.FederationServiceAsyncStub
) -> None:
    url = pair.b.url("/api/v1/federation/invitations:redeem")
    body = await call(http, "POST", url, json={"invitation_id": "x", "public_key": "AAAA", "proof": ""}, expect=400)
    fields = {v["field"] for d in body["error"]["details"] for v in d.get("field_violations", [])}
    assert fields == {"invitation_id", "public_key", "proof", "credential_id"}, body
    # A well-formed redemption of a code B issued, with a proof from a wrong secret: 403, and still redeemable.
    code = await invite(http, pair.b, name="rest-peer")
    good = redemption(code)
    wrong = redemption(tamper(code))
    as_json = {
        "invitation_id": wrong.invitation_id,
        "public_key": base64.b64encode(wrong.public_key).decode(),
        "credential_id": wrong.credential_id,
        "proof": base64.b64encode(wrong.proof).decode(),
    }
    body = await call(http, "POST", url, json=as_json, expect=403)
    assert reason(body)[0] == "INVITATION_INVALID"
    as_json.update(public_key=base64.b64encode(good.public_key).decode(), credential_id=good.credential_id)
    as_json.update(proof=base64.b64encode(good.proof).decode())
    answer = await call(http, "POST", url, json=as_json)
    assert answer["credential_id"] and answer["registry_name"] == "mesh-inv-b" and "avf_" not in json.dumps(answer)

    # Without a credential the call is limited per caller: a burst gets 429 with a retry delay. (Last in this module:
    # it spends the loopback caller's minute, which A's registry shares.)
    statuses: list[grpc.StatusCode] = []
    for _ in range(2 * RATE_LIMIT + 2):
        try:
            await b_api.RedeemFederationInvitation(redemption(code), timeout=10)
        except grpc.aio.AioRpcError as exc:
            statuses.append(exc.code())
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
    assert statuses[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, statuses[-3:]
    assert set(statuses[:-1]) <= {grpc.StatusCode.FAILED_PRECONDITION}
