"""The inbound signed-request check against a real Redis: signature, freshness, replay and the rate limit."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2

from agentvault.common import signing
from agentvault.common.errors import AgentVaultError, RateLimited
from agentvault.common.signed_requests import SignedRequests
from agentvault.federation.v1 import federation_service_pb2 as fpb

from ..conftest import Infra

SECRET = "avf_0123456789abcdef_the-secret"
METHOD = "/agentvault.federation.v1.FederationService/SearchAgents"


@pytest.fixture
async def redis(infra: Infra) -> AsyncIterator[aioredis.Redis]:
    # Database 0: meshes are numbered from 1. Each test's scope is unique, so its keys are its own.
    client = aioredis.Redis.from_url(f"{infra.redis_base}/0")
    yield client
    await client.aclose()


def check(redis: aioredis.Redis, *, per_minute: int = 100) -> SignedRequests:
    return SignedRequests(redis, scope="t" + secrets.token_hex(6), max_age=300, per_minute=per_minute)


def signed(request: fpb.SearchAgentsRequest, *, secret: str = SECRET, timestamp: int | None = None) -> list:
    nonce = signing.new_nonce()
    body = signing.grpc_body(request.SerializeToString(deterministic=True))
    signature = signing.sign(signing.GRPC_METHOD, METHOD, body, secret, timestamp=timestamp, nonce=nonce)
    return [(signing.SIGNATURE_HEADER, signature), (signing.NONCE_HEADER, nonce)]


async def refusal(gate: SignedRequests, metadata: list, request: fpb.SearchAgentsRequest) -> AgentVaultError:
    with pytest.raises(AgentVaultError) as err:
        await gate.admit(metadata, METHOD, request, SECRET, "caller")
    return err.value


async def test_a_good_signature_is_accepted(redis: aioredis.Redis) -> None:
    request = fpb.SearchAgentsRequest(search="weather")
    await check(redis).admit(signed(request), METHOD, request, SECRET, "caller")


async def test_a_wrong_signature_is_refused(redis: aioredis.Redis) -> None:
    request = fpb.SearchAgentsRequest(search="weather")
    gate = check(redis)
    error = await refusal(gate, signed(request, secret=SECRET + "x"), request)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SIGNATURE_INVALID")
    # Signed for another request: the body is covered too.
    error = await refusal(gate, signed(fpb.SearchAgentsRequest(search="other")), request)
    assert error.reason == "SIGNATURE_INVALID"


async def test_a_missing_signature_is_refused_when_required(redis: aioredis.Redis) -> None:
    request = fpb.SearchAgentsRequest()
    assert (await refusal(check(redis), [], request)).reason == "SIGNATURE_MISSING"


async def test_a_replayed_nonce_is_refused(redis: aioredis.Redis) -> None:
    request = fpb.SearchAgentsRequest(search="weather")
    gate = check(redis)
    metadata = signed(request)
    await gate.admit(metadata, METHOD, request, SECRET, "caller")
    error = await refusal(gate, metadata, request)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SIGNATURE_REPLAYED")
    # The same request with a new nonce is a new request.
    await gate.admit(signed(request), METHOD, request, SECRET, "caller")


async def test_a_stale_timestamp_is_refused(redis: aioredis.Redis) -> None:
    request = fpb.SearchAgentsRequest(search="weather")
    gate = check(redis)
    error = await refusal(gate, signed(request, timestamp=int(time.time()) - 301), request)
    assert error.reason == "SIGNATURE_INVALID" and "expired" in error.message
    error = await refusal(gate, signed(request, timestamp=int(time.time()) + 3600), request)
    assert error.reason == "SIGNATURE_INVALID" and "future" in error.message


async def test_over_the_rate_is_refused_with_when_to_retry(redis: aioredis.Redis) -> None:
    request = fpb.SearchAgentsRequest(search="weather")
    gate = check(redis, per_minute=3)
    now = 60 * 1000 + 15.0  # 15 s into a minute: the next window opens in 45 s
    for _ in range(3):
        await gate.admit(signed(request, timestamp=int(now)), METHOD, request, SECRET, "caller", now=now)
    with pytest.raises(RateLimited) as err:
        await gate.admit(signed(request, timestamp=int(now)), METHOD, request, SECRET, "caller", now=now)
    refused = err.value
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.reason == "FEDERATION_RATE_LIMITED"
    assert refused.retry_after_seconds == 46
    infos = [d for d in refused.details() if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    assert info.retry_delay.seconds == 46
    # Another caller has a rate of its own.
    await gate.admit(signed(request, timestamp=int(now)), METHOD, request, SECRET, "other", now=now)


async def test_without_redis_it_fails_closed() -> None:
    from agentvault.devserver.embedded import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        request = fpb.SearchAgentsRequest()
        error = await refusal(check(client), signed(request), request)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "FEDERATION_REDIS_DOWN")
    finally:
        await client.aclose()


async def test_the_http_form_must_match_its_signed_url(redis: aioredis.Redis) -> None:
    """Through the edge the peer signs the HTTP request line; the request built from the URL must match it."""
    path = "/api/v1/agents?search=weather"
    nonce = signing.new_nonce()
    signature = signing.sign("GET", path, "", SECRET, nonce=nonce)
    metadata = [
        (signing.SIGNATURE_HEADER, signature),
        (signing.NONCE_HEADER, nonce),
        ("x-http-method", "GET"),
        ("x-http-path", path),
    ]
    gate = check(redis)
    with pytest.raises(AgentVaultError) as err:
        await gate.admit(metadata, METHOD, fpb.SearchAgentsRequest(search="other"), SECRET, "c", url_fields=("search",))
    assert err.value.reason == "SIGNATURE_INVALID"
    await gate.admit(metadata, METHOD, fpb.SearchAgentsRequest(search="weather"), SECRET, "c", url_fields=("search",))
