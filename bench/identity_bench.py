"""`python -m bench.identity_bench`: issue 10's figures: tokens/s, GetAgent with a JWT vs an API key, one validation.

1. Tokens per second at the token endpoint (client_credentials, client_secret_basic): POST /oauth/token through
   the edge, against the bare-HTTP floor, and the registry's gRPC Token directly, against the bare gRPC echo, both
   ceilings measured in the same run at the same concurrency. Calls rotate over many clients and the per-client and
   per-source limits are raised for the run, so the endpoint is measured, not its rate limiter.
2. GetAgent of private agents (so the credential decides what is seen and is resolved on every call) with an API
   key and with a JWT of the same principal, in interleaved rounds; then the same with the registry's memory of
   verified tokens off (OAUTH_TOKEN_CACHE_BYTES=0), i.e. a full ES256 verification per call.
3. In this process: one validation by JwtValidator with its memory off (every call verifies in full), a bare
   joserfc ES256 verification of the same token and a bare `cryptography` ECDSA verification, and a remembered one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jws

from agentvault.common import jose_keys
from agentvault.common.jwt_auth import CACHE_BYTES_VAR, JwtValidator
from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from bench.load import GrpcJob, LoadClient
from bench.procs import machine, pinned, postmaster_pid, run_loop, sigterm_as_interrupt
from bench.report import Figure, judge, table, write_json
from bench.suite import GET_METHOD, REPO, Ceilings, Config, Runner, _create_database, infrastructure

IDENTITY_SERVICE = ipb.DESCRIPTOR.services_by_name["IdentityService"].full_name
TOKEN_METHOD = f"/{IDENTITY_SERVICE}/Token"
# The goal: GetAgent with a JWT at least this share of GetAgent with an API key.
JWT_VS_API_KEY = 0.95
# Limits high enough that no call of the run is refused by the token endpoint's rate limiter.
UNLIMITED = str(10**9)


def parse(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.identity_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short measurements (~1 min)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (default 5, quick 1.5)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight (default 16)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--output", type=Path, default=REPO / ".build" / "bench" / "identity.json")
    args = parser.parse_args(argv)
    available = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(available) >= 2
    return Config(
        quick=args.quick,
        sizes=(),
        warmup=0.5 if args.quick else 1.0,
        duration=args.duration if args.duration is not None else (1.5 if args.quick else 5.0),
        concurrency=args.concurrency,
        channels=4,
        server_cpus=frozenset({available[0]}) if pin else None,
        client_cpus=frozenset({available[-1]}) if pin else None,
        output=args.output,
        edge=True,
    )


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()).decode()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# 3. One validation, in this process -------------------------------------------------------------------------


def _per_call_us(call: Callable[[], Any], count: int, rounds: int = 5) -> float:
    """Median over rounds of the mean time of one call, in microseconds."""
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(count):
            call()
        means.append((time.perf_counter() - t0) / count * 1e6)
    return statistics.median(means)


async def _per_await_us(call: Callable[[], Awaitable[Any]], count: int, rounds: int = 5) -> float:
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(count):
            await call()
        means.append((time.perf_counter() - t0) / count * 1e6)
    return statistics.median(means)


def validation_cost(quick: bool) -> list[Figure]:
    key = jose_keys.generate_key()
    issuer, audience = "https://mesh.example", "agentvault"
    signed = jose_keys.sign_access_token(
        key, issuer=issuer, audience=audience, subject="cli_bench", client_id="cli_bench", scopes=["agents:read"],
        ttl=3600, kind="agent", owner="prn_bench",
    )  # fmt: skip
    token = signed.token
    public = jose_keys.import_key(jose_keys.public_jwk(key))
    jwks = jose_keys.jwks([key])

    async def source() -> dict[str, Any]:
        return jwks

    # The bare verification: the ECDSA check over header.payload, as any ES256 library must do it.
    signing_input, _, signature = token.rpartition(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    crypto_key = public.public_key
    assert isinstance(crypto_key, ec.EllipticCurvePublicKey)
    count = 300 if quick else 2000
    figures: list[Figure] = []
    results: dict[str, float] = {}

    async def measure() -> None:
        cold = JwtValidator(issuer, audience, source, cache_bytes=0)
        warm = JwtValidator(issuer, audience, source)
        await cold.validate(token)
        await warm.validate(token)
        results["bare cryptography ECDSA P-256 verify"] = _per_call_us(
            lambda: crypto_key.verify(der, signing_input.encode(), ec.ECDSA(hashes.SHA256())), count
        )
        results["bare joserfc ES256 verify (deserialize_compact)"] = _per_call_us(
            lambda: jws.deserialize_compact(token, public, algorithms=["ES256"]), count
        )
        results["JwtValidator.validate, memory off (full check)"] = await _per_await_us(
            lambda: cold.validate(token), count
        )
        results["JwtValidator.validate, remembered token"] = await _per_await_us(lambda: warm.validate(token), count)
        if cold.cache_hits or not warm.cache_hits:
            raise RuntimeError("the memory-off validator hit its memory or the other did not: the labels would lie")

    run_loop(measure())
    bare = results["bare joserfc ES256 verify (deserialize_compact)"]
    print(f"\none validation (this process, {count} calls x 5 rounds, median of the rounds' means):", flush=True)
    for name, us in results.items():
        figure = Figure("one validation", name, note=f"{us:.1f} us per call ({us / bare:.2f}x bare joserfc)")
        figure.extra = {"us_per_call": us, "vs_bare_joserfc": us / bare}
        figures.append(figure)
        print(f"  {name:<52} {us:8.1f} us  ({us / bare:.2f}x the bare joserfc verify)", flush=True)
    return figures


# The mesh -----------------------------------------------------------------------------------------------------


class Setup:
    """The callers of the run: an admin API key, OAuth clients it registered, a JWT of one of them, and private
    agents owned by the key's principal (which the JWT acts for)."""

    def __init__(self) -> None:
        self.api_key = ""
        self.jwt = ""
        self.clients: list[tuple[str, str]] = []
        self.agent_ids: list[str] = []


async def prepare(address: str, admin_token: str, clients: int, agents: int) -> Setup:
    setup = Setup()
    async with grpc.aio.insecure_channel(address) as channel:
        registry = pb_grpc.RegistryServiceStub(channel)
        identity = ipb_grpc.IdentityServiceStub(channel)
        created = await registry.CreateApiKey(
            pb.CreateApiKeyRequest(name="bench-admin", role=pb.ROLE_ADMIN), metadata=bearer(admin_token)
        )
        setup.api_key = created.token
        for index in range(clients):
            client = await identity.CreateOAuthClient(
                ipb.CreateOAuthClientRequest(name=f"bench-{index}", scopes=["agents:read"]),
                metadata=bearer(setup.api_key),
            )
            setup.clients.append((client.client.client_id, client.client_secret))
        client_id, secret = setup.clients[0]
        reply = await identity.Token(
            ipb.TokenRequest(form={"grant_type": "client_credentials"}, authorization_header=basic(client_id, secret))
        )
        if reply.http_status != 200:
            raise RuntimeError(f"the token endpoint refused the bench's client: {reply.json_body}")
        setup.jwt = json.loads(reply.json_body)["access_token"]
        for index in range(agents):
            agent = pb.Agent(
                did=f"did:web:bench.example:agent-{uuid.uuid4().hex[:12]}",
                name=f"Bench agent {index}",
                description="A private agent: only its owner may read it, so every read resolves the credential",
                version="1.0.0",
                agent_type="nlp",
                tags=["bench", "private"],
                capabilities=[pb.Capability(kind=pb.CAPABILITY_KIND_SKILL, name="summarize", version="1.4.2")],
                endpoints=[pb.Endpoint(protocol=pb.PROTOCOL_HTTP, url=f"https://agents.example/bench/{index}")],
                sharing=pb.SHARING_PRIVATE,
            )
            made = await registry.CreateAgent(pb.CreateAgentRequest(agent=agent), metadata=bearer(setup.api_key))
            setup.agent_ids.append(made.id)
        # The credential decides: both see a private agent, an anonymous caller does not.
        first = pb.GetAgentRequest(id=setup.agent_ids[0])
        await registry.GetAgent(first, metadata=bearer(setup.api_key))
        await registry.GetAgent(first, metadata=bearer(setup.jwt))
        try:
            await registry.GetAgent(first)
            raise RuntimeError("an anonymous caller read a private agent: the bench would not measure credentials")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
    return setup


def cpu_ms(figure: Figure, group: str) -> float:
    """Milliseconds of CPU `group` spent per answered call."""
    return figure.cpu.get(group, 0.0) / 100 / max(figure.throughput or 1.0, 1.0) * 1000


def token_endpoint(
    runner: Runner, ceilings: Ceilings, mesh: Mesh, setup: Setup, edge_up: bool, postmaster: int | None
) -> None:
    c = runner.config.concurrency
    section = "token endpoint"
    registry: dict[str, list[int]] = {"server": [mesh.processes["registry"].pid]}
    expand = {"db": postmaster} if postmaster else {}
    if postmaster:
        registry["db"] = [postmaster]
    echo = ceilings.echo(section, c)
    form = ipb.TokenRequest
    requests = tuple(
        form(
            form={"grant_type": "client_credentials"}, authorization_header=basic(cid, secret), source="127.0.0.1"
        ).SerializeToString()
        for cid, secret in setup.clients
    )
    job = runner.grpc_job(mesh.address("registry"), TOKEN_METHOD, requests, c)
    grpc_token = runner.measure(section, f"gRPC Token client_credentials c={c}", job, registry, expand)
    share = (grpc_token.throughput or 0.0) / max(echo.throughput or 1.0, 1.0)
    grpc_token.note = (
        f"{share:.1%} of the gRPC echo measured just before ({len(setup.clients)} clients rotated); registry CPU "
        f"{cpu_ms(grpc_token, 'server'):.2f} ms per token, PostgreSQL {cpu_ms(grpc_token, 'db'):.2f} ms"
    )
    grpc_token.extra["share_of_echo"] = share
    print(f"    {grpc_token.note}", flush=True)
    if not edge_up:
        return
    floor = ceilings.http_floor(section)
    job_http = runner.http_job(mesh.url(), ("/oauth/token",))
    job_http = type(job_http)(
        job_http.base_url, job_http.paths, c, job_http.warmup, job_http.duration, method="POST",
        bodies=(b"grant_type=client_credentials",),
        headers=tuple(
            (("Authorization", basic(cid, secret)), ("Content-Type", "application/x-www-form-urlencoded"))
            for cid, secret in setup.clients
        ),
    )  # fmt: skip
    with_edge = {**registry, "edge": [mesh.processes["edge"].pid]}
    http_token = runner.measure(section, f"POST /oauth/token client_credentials c={c}", job_http, with_edge, expand)
    share = (http_token.throughput or 0.0) / max(floor.throughput or 1.0, 1.0)
    http_token.note = (
        f"{share:.1%} of the bare aiohttp floor measured just before; CPU per token: edge "
        f"{cpu_ms(http_token, 'edge'):.2f} ms, registry {cpu_ms(http_token, 'server'):.2f} ms, PostgreSQL "
        f"{cpu_ms(http_token, 'db'):.2f} ms"
    )
    http_token.extra["share_of_floor"] = share
    print(f"    {http_token.note}", flush=True)


def jwt_vs_api_key(runner: Runner, mesh: Mesh, setup: Setup, label: str, rounds: int) -> tuple[Figure, Figure]:
    """GetAgent with the API key and with the JWT, alternating which goes first each round (drift cancels)."""
    c = runner.config.concurrency
    registry = {"server": [mesh.processes["registry"].pid]}
    requests = tuple(pb.GetAgentRequest(id=i).SerializeToString() for i in setup.agent_ids)
    jobs = {
        "api key": runner.grpc_job(mesh.address("registry"), GET_METHOD, requests, c),
        "JWT": runner.grpc_job(mesh.address("registry"), GET_METHOD, requests, c),
    }
    jobs = {
        name: GrpcJob(job.address, job.method, job.requests, job.concurrency, job.channels, job.warmup,
                      job.duration, metadata=(bearer(setup.api_key if name == "api key" else setup.jwt),))
        for name, job in jobs.items()
    }  # fmt: skip
    done: dict[str, list[Figure]] = {"api key": [], "JWT": []}
    section = f"GetAgent {label}"
    for index in range(rounds):
        order = ("api key", "JWT") if index % 2 == 0 else ("JWT", "api key")
        for name in order:
            done[name].append(runner.measure(section, f"GetAgent private, {name}, round {index + 1}", jobs[name],
                                             registry))  # fmt: skip
    totals = {}
    for name, figures in done.items():
        requests_done = sum(f.extra["requests"] for f in figures)
        elapsed = sum(f.extra["elapsed"] for f in figures)
        errors = sum(f.errors for f in figures)
        cpu = statistics.mean(f.cpu.get("server", 0.0) for f in figures)
        totals[name] = Figure(section, f"GetAgent private agent, {name} c={c} ({rounds} rounds)",
                              requests_done / elapsed, statistics.median(f.p50_ms or 0 for f in figures),
                              statistics.median(f.p99_ms or 0 for f in figures), errors, {"server": cpu})  # fmt: skip
    api, jwt = totals["api key"], totals["JWT"]
    share = (jwt.throughput or 0.0) / max(api.throughput or 1.0, 1.0)
    judge(jwt, f">= {JWT_VS_API_KEY:.0%} of API key ({share:.0%})", share >= JWT_VS_API_KEY)
    jwt.extra["share_of_api_key"] = share
    print(f"  {section}: API key {api.throughput:,.0f} req/s, JWT {jwt.throughput:,.0f} req/s: JWT {share:.1%} of "
          f"API key (goal >= {JWT_VS_API_KEY:.0%}: {jwt.verdict})", flush=True)  # fmt: skip
    return api, jwt


def run(config: Config) -> int:
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores; load average at start {info['load_average_at_start']}")
    print(f"concurrency {config.concurrency}; {config.warmup:g} s warm-up + {config.duration:g} s per measurement; "
          f"CPU split: {config.split()}", flush=True)  # fmt: skip
    summary = [*validation_cost(config.quick)]
    client = LoadClient(set(config.client_cpus) if config.client_cpus else None)
    runner = Runner(config, client)
    ceilings = Ceilings(config, runner)
    rounds = 2 if config.quick else 4
    try:
        with tempfile.TemporaryDirectory(prefix="agentvault-identity-") as tmp, infrastructure(Path(tmp)) as infra:
            postgres, redis_url = infra
            asyncio.run(_create_database(postgres.uri(), "bench"))
            admin_token = "bench-admin-" + secrets.token_urlsafe(16)
            env = {
                "DATABASE_URL": postgres.uri("bench"),
                "REDIS_URL": redis_url,
                "AGENTVAULT_ADMIN_TOKEN": admin_token,
                "AGENTVAULT_DATA_DIR": str(Path(tmp) / "data"),
                "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
                "REGISTRY_METRICS_PORT": str(free_port()),
                "OAUTH_TOKEN_RATE_LIMIT_PER_CLIENT": UNLIMITED,
                "OAUTH_TOKEN_RATE_LIMIT_PER_SOURCE": UNLIMITED,
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO",
            }
            print("\nthe token endpoint's rate limits are raised to 10^9 a minute (per client and per source) for "
                  "this run, and calls rotate over 16 clients: the figures are the endpoint's, not its limiter's",
                  flush=True)  # fmt: skip
            mesh = Mesh(env, log_dir=Path(tmp) / "logs", services=SERVICES)
            try:
                with pinned(set(config.server_cpus or ())):
                    mesh.start_service("registry", timeout=60)
                setup = asyncio.run(prepare(mesh.address("registry"), admin_token, 16, 200))
                edge_up = True
                try:
                    with pinned(set(config.server_cpus or ())):
                        mesh.start_service("edge", timeout=60)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    edge_up = False
                    print(f"  edge: not available ({str(exc)[-300:]})", flush=True)
                token_endpoint(runner, ceilings, mesh, setup, edge_up, postmaster_pid(Path(tmp) / "pg"))
                if edge_up:
                    mesh.stop_service("edge")
                api, jwt = jwt_vs_api_key(runner, mesh, setup, "(token memory on)", rounds)
                runner.figures += [api, jwt]
                # Again with every JWT verified in full: what the memory of verified tokens buys.
                mesh.stop_service("registry")
                mesh.env[CACHE_BYTES_VAR] = "0"
                with pinned(set(config.server_cpus or ())):
                    mesh.start_service("registry", timeout=60)
                api_off, jwt_off = jwt_vs_api_key(runner, mesh, setup, "(token memory off)", rounds)
                runner.figures += [api_off, jwt_off]
            finally:
                mesh.stop()
    finally:
        ceilings.close()
        client.close()
    runner.figures += summary
    print("\n" + table(runner.figures))
    write_json(config.output, {"machine": info, "concurrency": config.concurrency}, runner.figures)
    print(f"\nfigures written to {config.output}")
    return 0


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    with sigterm_as_interrupt():
        sys.exit(run(parse()))


if __name__ == "__main__":
    main()
