"""`python -m bench.messaging_bench [--quick]`: issue 12's figures: durable sends, send-to-delivery, inbox drain.

All on 127.0.0.1 in a temporary folder: embedded PostgreSQL and Redis, the registry and the messaging service as
real processes (agentvault.devserver.Mesh), one permit policy for message.send, and local agents each with an OAuth
client of its own (messages:send) whose access token it sends with. The ceilings are measured in the same run:

1. Ceilings: the bare gRPC echo (bench/echo.py) driven by the load client at the same concurrency and channels as
   the sends, and a bare redis-py stream loop on the same Redis server (XADD, XREADGROUP, XACK per message, asyncio,
   the same number of workers): messages per second of each.
2. Durable sends: SendMessage from one agent to another's inbox, same load client shape as the echo; goal at least
   40% of the echo. p50/p99 at the client, and the service's own grpc_server_handling_seconds.
3. Send-to-delivery: the recipient holds a StreamInbox (max_in_flight 1000) and acks every delivery (AckMessages of
   what arrived while its last ack call was on its way, as a streaming consumer would); the sender sends
   at a paced rate (500/s); each message carries, in a header, the time taken just before its SendMessage call, and
   the receiver computes the latency when the delivery arrives on the stream. Goals: p50 < 3 ms, p99 < 15 ms.
4. Drain: N messages (100,000; --quick 10,000) queued into one inbox by concurrent SendMessage (timed), then drained
   by concurrent receivers, each ReceiveMessages(max_messages 100) then one AckMessages of the batch; goal >= 2,000/s.
5. A2A exchange, one a2a-sdk client making blocking SendMessage calls one at a time (c=1), each a new message of
   one ~200-byte text part: (a) straight to an a2a-sdk agent that answers with a Message of the same parts (uvicorn,
   its own process on loopback), vs (b) through the edge's /a2a/agents/{id} to a local agent whose process holds a
   StreamInbox and replies (in_reply_to) with the same parts, then acks. Goal: p50 of (b) minus p50 of (a) <= 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import redis.asyncio as aioredis

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.identity.v1 import identity_service_pb2 as ipb
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2 as ppb
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc
from bench import promhist
from bench.echo import DURABLE_METHOD
from bench.identity_bench import basic, bearer
from bench.load import CHANNEL_OPTIONS, GrpcJob, LoadClient, LoadResult, drive, percentile
from bench.procs import CpuMeter, machine, pinned, postmaster_pid, run_loop, sigterm_as_interrupt
from bench.report import Figure, judge, table, write_json
from bench.suite import REPO, Ceilings, Config, Runner, _create_database

MESSAGING_SERVICE = mpb.DESCRIPTOR.services_by_name["MessagingService"].full_name
SEND_METHOD = f"/{MESSAGING_SERVICE}/SendMessage"
# The goals. They live here, in the benchmark, and never in the tests.
SEND_VS_ECHO = 0.40
STREAM_P50_MS = 3.0
STREAM_P99_MS = 15.0
DRAIN_PER_S = 2_000.0
A2A_OVERHEAD_P50_MS = 2.0
PERMIT = 'permit(principal, action == Action::"message.send", resource);'
SENT_HEADER = "bench-sent-ns"
PHASE_HEADER = "bench-phase"
# A small message: one text part of about 200 bytes.
TEXT = "Please summarize the attached quarterly report and answer with the three main risks. " * 2
IN_FLIGHT = 1000
# How long after its last send a paced run waits for the deliveries: an overloaded service drains a backlog.
ARRIVAL_WAIT = 120.0
CALL_TIMEOUT = 30.0
SECTION = "messaging"
T = TypeVar("T")
# The A2A comparison's processes (python -m bench.messaging_bench <role> ...): the direct agent and the local agent.
A2A_ECHO_ROLE = "--a2a-echo-agent"
INBOX_REPLIER_ROLE = "--inbox-replier"
TOKEN_VAR = "BENCH_AGENT_TOKEN"  # the local agent's token, not on its command line


@dataclass(frozen=True)
class Plan:
    rate: float
    low_rate: float
    stream_seconds: float
    queued: int
    receivers: int
    profile: Path | None
    a2a_rounds: int = 1000


@dataclass(frozen=True)
class LocalAgent:
    """A registered agent and an access token of its own OAuth client (kind agent)."""

    id: str
    token: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)


def parse(argv: list[str] | None = None) -> tuple[Config, Plan]:
    parser = argparse.ArgumentParser(prog="python -m bench.messaging_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short measurements, 10,000 queued (~1-2 min)")
    parser.add_argument("--duration", type=float, help="seconds per throughput measurement (default 10, quick 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight (default 16)")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels of the load client (default 4)")
    parser.add_argument("--rate", type=float, default=500.0, help="paced sends per second to the stream (500)")
    parser.add_argument(
        "--low-rate", type=float, default=50.0, help="a reference paced run first, no goal (50; 0: none)"
    )
    parser.add_argument("--stream-seconds", type=float, help="seconds of paced sends (default 10, quick 3)")
    parser.add_argument("--queue", type=int, help="messages queued, then drained (default 100,000, quick 10,000)")
    parser.add_argument("--receivers", type=int, default=4, help="concurrent receivers of the drain (default 4)")
    parser.add_argument(
        "--a2a-rounds", type=int, help="measured A2A exchanges on each path (default 1,000, quick 200; 0: none)"
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record the messaging process with py-spy (collapsed stacks, DIR/<phase>.txt) during each phase; "
        "the figures are then disturbed",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--output", type=Path, default=REPO / ".build" / "bench" / "messaging.json")
    args = parser.parse_args(argv)
    available = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(available) >= 2
    config = Config(
        quick=args.quick,
        sizes=(),
        warmup=1.0 if args.quick else 2.0,
        duration=args.duration if args.duration is not None else (3.0 if args.quick else 10.0),
        concurrency=args.concurrency,
        channels=args.channels,
        server_cpus=frozenset({available[0]}) if pin else None,
        client_cpus=frozenset({available[-1]}) if pin else None,
        output=args.output,
        edge=False,
    )
    plan = Plan(
        rate=args.rate,
        low_rate=args.low_rate,
        stream_seconds=args.stream_seconds or (3.0 if args.quick else 10.0),
        queued=args.queue or (10_000 if args.quick else 100_000),
        receivers=args.receivers,
        profile=args.py_spy,
        a2a_rounds=args.a2a_rounds if args.a2a_rounds is not None else (200 if args.quick else 1000),
    )
    return config, plan


def on_uvloop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a measurement loop of the bench on uvloop, as the load client and the services run theirs."""
    box: list[T] = []

    async def main() -> None:
        box.append(await coroutine)

    run_loop(main())
    return box[0]


def text_message(recipient: str, **headers: str) -> mpb.Message:
    return mpb.Message(recipient=mpb.Party(agent_id=recipient), parts=[mpb.Part(text=TEXT)], headers=headers)


# The mesh -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def infrastructure(root: Path) -> Iterator[tuple[EmbeddedPostgres, EmbeddedRedis]]:
    postgres = EmbeddedPostgres(root / "pg", delete_on_stop=True)
    redis = EmbeddedRedis(root / "redis")
    try:
        postgres.start()
        redis.start()
        yield postgres, redis
    finally:
        redis.stop()
        postgres.stop()


async def prepare(address: str, admin_token: str, roles: tuple[str, ...]) -> dict[str, LocalAgent]:
    """The permit policy and one local agent per role, each with an OAuth client bound to it and a token."""
    agents: dict[str, LocalAgent] = {}
    admin = bearer(admin_token)
    async with grpc.aio.insecure_channel(address) as channel:
        registry = pb_grpc.RegistryServiceStub(channel)
        identity = ipb_grpc.IdentityServiceStub(channel)
        policies = ppb_grpc.PolicyServiceStub(channel)
        policy = ppb.Policy(name="bench-messages-allowed", text=PERMIT, enabled=True)
        await policies.CreatePolicy(ppb.CreatePolicyRequest(policy=policy), metadata=admin)
        for role in roles:
            agent = await registry.CreateAgent(
                pb.CreateAgentRequest(
                    agent=pb.Agent(
                        did=f"did:web:bench.example:{role}-{secrets.token_hex(6)}",
                        name=f"bench {role}",
                        version="1.0.0",
                        sharing=pb.SHARING_LOCAL,
                    )
                ),
                metadata=admin,
            )
            created = await identity.CreateOAuthClient(
                ipb.CreateOAuthClientRequest(
                    name=f"bench-{role}", scopes=["messages:send", "agents:read"], agent_id=agent.id
                ),
                metadata=admin,
            )
            reply = await identity.Token(
                ipb.TokenRequest(
                    form={"grant_type": "client_credentials"},
                    authorization_header=basic(created.client.client_id, created.client_secret),
                    source="127.0.0.1",
                )
            )
            if reply.http_status != 200:
                raise RuntimeError(f"the token endpoint refused the bench's client: {reply.json_body}")
            agents[role] = LocalAgent(agent.id, json.loads(reply.json_body)["access_token"])
    return agents


async def wait_until_sends_pass(address: str, sender: LocalAgent, recipient: str, timeout: float = 30.0) -> None:
    """Polls until the messaging service has the policy set that lets the sender's message through."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = mpb_grpc.MessagingServiceStub(channel)
        while True:
            try:
                await stub.SendMessage(mpb.SendMessageRequest(message=text_message(recipient)), metadata=sender.md)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.PERMISSION_DENIED or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)


# Measurements -------------------------------------------------------------------------------------------------


def _latency_figure(name: str, done: int, elapsed: float, latencies_ms: list[float], errors: int) -> Figure:
    latencies_ms.sort()
    return Figure(
        SECTION,
        name,
        done / max(elapsed, 1e-9),
        percentile(latencies_ms, 0.5),
        percentile(latencies_ms, 0.99),
        errors,
        extra={
            "count": done,
            "elapsed_s": elapsed,
            "p90_ms": percentile(latencies_ms, 0.9),
            "max_ms": latencies_ms[-1] if latencies_ms else 0.0,
        },
    )


def _show(figure: Figure) -> None:
    print(f"  {figure.section:<16} {figure.name:<52} {figure.throughput or 0:>9,.0f} /s  p50 {figure.p50_ms or 0:7.2f} "
          f"ms  p99 {figure.p99_ms or 0:7.2f} ms  errors {figure.errors}", flush=True)  # fmt: skip


async def redis_stream_loop(url: str, concurrency: int, warmup: float, duration: float, meter: CpuMeter) -> Figure:
    """The Redis ceiling: per message one XADD, one XREADGROUP (COUNT 1) and one XACK, `concurrency` workers."""
    client = aioredis.Redis.from_url(url, max_connections=concurrency)
    stream, group = f"bench:stream:{uuid.uuid4().hex}", "bench"
    payload = text_message(str(uuid.uuid4())).SerializeToString()
    await client.xgroup_create(stream, group, id="0", mkstream=True)

    async def call(i: int) -> tuple[int, str]:
        await client.xadd(stream, {"m": payload})
        # RESP2: [[stream, [(entry id, fields)]]]
        got: Any = await client.xreadgroup(group, f"c{i}", {stream: ">"}, count=1)
        if not got or not got[0][1]:
            return 0, "XREADGROUP returned nothing"
        await client.xack(stream, group, got[0][1][0][0])
        return len(payload), ""

    try:
        task = asyncio.create_task(drive(call, concurrency, concurrency, warmup, duration))
        await asyncio.sleep(warmup)
        cpu: dict[str, float] = {}
        with meter.window(cpu):
            result: LoadResult = await task
    finally:
        await client.delete(stream)
        await client.aclose()
    figure = Figure(
        SECTION, f"ceiling: redis-py XADD+XREADGROUP+XACK c={concurrency}", result.throughput, result.p50_ms,
        result.p99_ms, result.errors, cpu, extra={**asdict(result), "concurrency": concurrency},
    )  # fmt: skip
    _show(figure)
    return figure


class Scrape:
    """Histograms of the messaging process, before and after a phase."""

    def __init__(self, url: str) -> None:
        self.url = url

        def rpc(method: str) -> tuple[str, dict[str, str]]:
            return "grpc_server_handling_seconds", {"grpc_service": MESSAGING_SERVICE, "grpc_method": method}

        self.series: dict[str, tuple[str, dict[str, str]]] = {
            "send_seconds": ("message_send_seconds", {}),
            "delivery_seconds": ("message_delivery_seconds", {"transport": "inbox"}),
            "grpc_send": rpc("SendMessage"),
            "grpc_receive": rpc("ReceiveMessages"),
            "grpc_ack": rpc("AckMessages"),
        }
        self.before: dict[str, promhist.Buckets] = {}

    def start(self) -> None:
        self.before = {k: promhist.scrape(self.url, m, labels) for k, (m, labels) in self.series.items()}

    def stop(self) -> dict[str, dict[str, float]]:
        out = {}
        for key, (metric, labels) in self.series.items():
            delta = promhist.difference(promhist.scrape(self.url, metric, labels), self.before.get(key, {}))
            if promhist.count(delta):
                out[key] = {
                    "count": promhist.count(delta),
                    "p50_ms": round(promhist.quantile(delta, 0.5) * 1000, 3),
                    "p99_ms": round(promhist.quantile(delta, 0.99) * 1000, 3),
                }
        return out


def _server_note(server: dict[str, dict[str, float]], keys: tuple[str, ...]) -> str:
    names = {"send_seconds": "send (accept)", "delivery_seconds": "accepted->delivered", "grpc_send": "SendMessage",
             "grpc_receive": "ReceiveMessages", "grpc_ack": "AckMessages"}  # fmt: skip
    parts = [f"{names[k]} p50 {server[k]['p50_ms']:.2f} p99 {server[k]['p99_ms']:.2f} ms" for k in keys if k in server]
    return "at the service (histograms, interpolated): " + "; ".join(parts) if parts else ""


class Profiler:
    """py-spy on the messaging process during a phase (only with --py-spy)."""

    def __init__(self, folder: Path | None, pid: int) -> None:
        self.folder = folder
        self.pid = pid

    @contextlib.contextmanager
    def phase(self, name: str, seconds: float) -> Iterator[None]:
        if self.folder is None:
            yield
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        output = self.folder / f"{name}.txt"
        process = subprocess.Popen(
            [str(spy), "record", "--pid", str(self.pid), "--duration", str(max(1, round(seconds))), "--rate", "200",
             "--format", "raw", "--nonblocking", "--output", str(output)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            yield
        finally:
            try:
                process.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait(10)
            print(f"    py-spy: {output}", flush=True)


async def send_to_delivery(
    address: str,
    sender: LocalAgent,
    receiver: LocalAgent,
    rate: float,
    seconds: float,
    warmup: float,
    meter: CpuMeter,
    scrape: Scrape,
    goal: bool,
) -> tuple[Figure, Figure]:
    """Paced sends to an inbox held by a StreamInbox that acks every delivery (batched AckMessages); latency by
    the header's send time.
    `goal`: judged against the issue's goals (else a reference figure)."""
    send_channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    receive_channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    sending = mpb_grpc.MessagingServiceStub(send_channel)
    receiving = mpb_grpc.MessagingServiceStub(receive_channel)
    template = text_message(receiver.id)
    arrived = {"w": 0, "m": 0}
    redelivered = 0
    delivery_ms: list[float] = []
    send_ms: list[float] = []
    errors: list[str] = []
    sent_ok = {"w": 0, "m": 0}
    acks: set[asyncio.Task[None]] = set()
    # The receiver's acks: one AckMessages call at a time, of every delivery that arrived while the last was on its
    # way (one per delivery when the pace is slow, batches under load), as a streaming consumer would.
    pending: list[mpb.AckMessageRequest] = []
    acking = {"on": False}

    async def ack_pending() -> None:
        try:
            await _ack_all()
        finally:
            acking["on"] = False  # (no await since the loop found nothing pending: nothing was missed)

    async def _ack_all() -> None:
        while pending:
            batch = pending[:1000]
            del pending[:1000]
            try:
                answer = await receiving.AckMessages(
                    mpb.AckMessagesRequest(receipts=batch), metadata=receiver.md, timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                errors.append(f"ack {exc.code().name}: {exc.details()}")
                continue
            errors.extend(f"ack {r.message_id}: {r.reason}" for r in answer.results if not r.acknowledged)

    stream = receiving.StreamInbox(
        mpb.StreamInboxRequest(max_in_flight=IN_FLIGHT, visibility_timeout_seconds=120), metadata=receiver.md
    )

    async def receive() -> None:
        nonlocal redelivered
        async for delivery in stream:
            now = time.perf_counter_ns()
            headers = delivery.message.headers
            if delivery.attempt != 1:
                redelivered += 1
            else:
                phase = headers.get(PHASE_HEADER, "")
                if phase in arrived:
                    arrived[phase] += 1
                if phase == "m":
                    delivery_ms.append((now - int(headers[SENT_HEADER])) / 1e6)
            pending.append(mpb.AckMessageRequest(message_id=delivery.message.id, receipt=delivery.receipt))
            if not acking["on"]:
                acking["on"] = True
                task = asyncio.create_task(ack_pending())
                acks.add(task)
                task.add_done_callback(acks.discard)

    async def send(phase: str) -> None:
        message = mpb.Message()
        message.CopyFrom(template)
        message.headers[PHASE_HEADER] = phase
        t0 = time.perf_counter_ns()
        message.headers[SENT_HEADER] = str(t0)
        try:
            await sending.SendMessage(mpb.SendMessageRequest(message=message), metadata=sender.md, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            errors.append(f"send {exc.code().name}: {exc.details()}")
            return
        if phase == "m":
            send_ms.append((time.perf_counter_ns() - t0) / 1e6)
        sent_ok[phase] += 1

    async def paced(phase: str, seconds: float) -> float:
        count = max(1, round(rate * seconds))
        tasks = []
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(phase)))
        sending_time = time.perf_counter() - start
        await asyncio.gather(*tasks)
        return count / max(sending_time, 1e-9)

    async def all_arrived(phase: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while arrived[phase] < sent_ok[phase]:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    receiver_task = asyncio.create_task(receive())
    try:
        await paced("w", warmup)
        if not await all_arrived("w", 30):
            raise RuntimeError(f"the stream delivered {arrived['w']} of {sent_ok['w']} warm-up messages in 30 s")
        cpu: dict[str, float] = {}
        scrape.start()
        with meter.window(cpu):
            achieved = await paced("m", seconds)
            complete = await all_arrived("m", ARRIVAL_WAIT)
        server = scrape.stop()
        missing = sent_ok["m"] - arrived["m"]
    finally:
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await receiver_task
        if acks:
            await asyncio.gather(*acks, return_exceptions=True)
        await send_channel.close()
        await receive_channel.close()
    n = len(delivery_ms)
    delivery = _latency_figure(
        f"send-to-delivery, StreamInbox + ack, {rate:g}/s paced{'' if goal else ' (reference)'}",
        n,
        seconds,
        delivery_ms,
        missing,
    )
    delivery.cpu = cpu
    passed = (delivery.p50_ms or 0) < STREAM_P50_MS and (delivery.p99_ms or 0) < STREAM_P99_MS and complete
    if goal:
        judge(delivery, f"p50 < {STREAM_P50_MS:g} ms, p99 < {STREAM_P99_MS:g} ms", passed)
    delivery.extra.update(achieved_send_rate=achieved, redelivered=redelivered, server=server, errors=errors[:5])
    delivery.note = (
        f"latency from just before SendMessage to the delivery's arrival on the stream, {n:,} messages at "
        f"{achieved:,.0f}/s achieved; p50 {'PASS' if (delivery.p50_ms or 0) < STREAM_P50_MS else 'MISS'}, p99 "
        f"{'PASS' if (delivery.p99_ms or 0) < STREAM_P99_MS else 'MISS'}; {missing} not delivered within "
        f"{ARRIVAL_WAIT:g} s after the last send, "
        f"{redelivered} redelivered. {_server_note(server, ('send_seconds', 'delivery_seconds', 'grpc_ack'))}"
    )
    sends = _latency_figure(f"SendMessage paced at {rate:g}/s (same run)", len(send_ms), seconds,
                            send_ms, sum(e.startswith("send") for e in errors))  # fmt: skip
    sends.note = "the sends of the row above, answered-call latency at the client"
    for figure in (delivery, sends):
        _show(figure)
    if errors:
        print(f"    first error: {errors[0]}", flush=True)
    return delivery, sends


async def fill(address: str, sender: LocalAgent, recipient: str, count: int, concurrency: int, channels: int) -> Figure:
    """Queues `count` messages into one inbox by concurrent SendMessage (pre-serialized, as the load client does)."""
    opened = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(channels)]
    stubs: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
        ch.unary_unary(SEND_METHOD, request_serializer=None, response_deserializer=None) for ch in opened
    ]
    request = mpb.SendMessageRequest(message=text_message(recipient)).SerializeToString()
    latencies: list[float] = []
    errors: list[str] = []
    next_index = iter(range(count))

    async def worker(n: int) -> None:
        for _ in next_index:
            t0 = time.perf_counter()
            try:
                await stubs[n % len(stubs)](request, metadata=sender.md, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        for channel in opened:
            await channel.close()
    figure = _latency_figure(f"queue fill: SendMessage c={concurrency}, {count:,} to one inbox", len(latencies),
                             elapsed, latencies, len(errors))  # fmt: skip
    figure.note = f"{count:,} messages queued in {elapsed:.1f} s"
    if errors:
        figure.note += f"; first error: {errors[0]}"
    _show(figure)
    return figure


async def drain(
    address: str, receiver: LocalAgent, count: int, receivers: int, meter: CpuMeter, scrape: Scrape
) -> list[Figure]:
    """Takes `count` queued messages out of one inbox: `receivers` loops of ReceiveMessages(100) and one AckMessages
    of what it received."""
    opened = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(receivers)]
    stubs: list[mpb_grpc.MessagingServiceAsyncStub] = [mpb_grpc.MessagingServiceStub(ch) for ch in opened]
    seen: set[str] = set()
    acked: set[str] = set()
    receive_ms: list[float] = []
    ack_ms: list[float] = []
    errors: list[str] = []
    duplicates = 0
    last_ack = 0.0
    request = mpb.ReceiveMessagesRequest(max_messages=100, visibility_timeout_seconds=600, wait_seconds=1)

    async def ack(stub: mpb_grpc.MessagingServiceAsyncStub, deliveries: list[mpb.Delivery]) -> None:
        nonlocal last_ack
        if not deliveries:
            return
        t0 = time.perf_counter()
        receipts = [mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt) for d in deliveries]
        try:
            answer = await stub.AckMessages(
                mpb.AckMessagesRequest(receipts=receipts), metadata=receiver.md, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            errors.append(f"ack {exc.code().name}: {exc.details()}")
            return
        last_ack = time.perf_counter()
        ack_ms.append((last_ack - t0) * 1000)
        for result in answer.results:
            if result.acknowledged:
                acked.add(result.message_id)
            else:
                errors.append(f"ack {result.message_id}: {result.reason}")

    async def worker(stub: mpb_grpc.MessagingServiceAsyncStub) -> None:
        nonlocal duplicates
        while len(seen) < count:
            t0 = time.perf_counter()
            try:
                answer = await stub.ReceiveMessages(request, metadata=receiver.md, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"receive {exc.code().name}: {exc.details()}")
                continue
            if answer.deliveries:
                receive_ms.append((time.perf_counter() - t0) * 1000)
            for delivery in answer.deliveries:
                if delivery.message.id in seen:
                    duplicates += 1
                seen.add(delivery.message.id)
            await ack(stub, list(answer.deliveries))

    cpu: dict[str, float] = {}
    scrape.start()
    try:
        with meter.window(cpu):
            start = time.perf_counter()
            await asyncio.gather(*(worker(stub) for stub in stubs))
        elapsed = max(last_ack - start, 1e-9)
        server = scrape.stop()
        # Nothing is left: one more receive answers empty.
        left = await stubs[0].ReceiveMessages(mpb.ReceiveMessagesRequest(max_messages=100), metadata=receiver.md)
    finally:
        for channel in opened:
            await channel.close()
    figure = Figure(SECTION, f"drain {count:,}: ReceiveMessages(100) + AckMessages of the batch, {receivers} receivers",
                    len(acked) / elapsed, errors=len(errors) + count - len(acked), cpu=cpu)  # fmt: skip
    judge(figure, f">= {DRAIN_PER_S:,.0f} messages/s", (figure.throughput or 0) >= DRAIN_PER_S and len(acked) == count)
    figure.extra = {"count": count, "acked": len(acked), "elapsed_s": elapsed, "duplicates": duplicates,
                    "left_after": len(left.deliveries), "server": server, "errors": errors[:5]}  # fmt: skip
    figure.note = (
        f"{len(acked):,} of {count:,} acked in {elapsed:.1f} s, {duplicates} delivered twice, {len(left.deliveries)} "
        f"left after. {_server_note(server, ('grpc_receive', 'grpc_ack'))}"
    )
    receives = _latency_figure("  ReceiveMessages(max 100) calls of the drain", len(receive_ms), elapsed, receive_ms, 0)
    acks = _latency_figure("  AckMessages (a batch each) calls of the drain", len(ack_ms), elapsed, ack_ms, 0)
    for f in (figure, receives, acks):
        _show(f)
    if errors:
        print(f"    first error: {errors[0]}", flush=True)
    return [figure, receives, acks]


async def inbox_statuses(dsn: str, agent_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM messages WHERE inbox = $1 GROUP BY status", f"agent:{agent_id}"
        )
    finally:
        await conn.close()
    return {r["status"]: int(r["n"]) for r in rows}


# The run ------------------------------------------------------------------------------------------------------


# 5. A2A through the mesh vs direct -----------------------------------------------------------------------------


async def a2a_echo_agent(port: str) -> None:
    """The direct path's agent: a2a-sdk's own server answering each message with a Message of the same parts."""
    import uvicorn
    from a2a.server.agent_execution import AgentExecutor, RequestContext
    from a2a.server.events import EventQueue
    from a2a.server.request_handlers import DefaultRequestHandler
    from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
    from a2a.server.tasks import InMemoryTaskStore
    from a2a.types import a2a_pb2 as a2a
    from starlette.applications import Starlette

    class Echo(AgentExecutor):
        async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
            assert context.message is not None
            await event_queue.enqueue_event(
                a2a.Message(
                    message_id=str(uuid.uuid4()),
                    context_id=context.context_id or "",
                    role=a2a.ROLE_AGENT,
                    parts=list(context.message.parts),
                )
            )

        async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
            return None

    base = f"http://127.0.0.1:{port}"
    card = a2a.AgentCard(
        name="bench echo",
        description="answers with the parts it received",
        version="1.0.0",
        supported_interfaces=[
            a2a.AgentInterface(url=f"{base}/a2a", protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=a2a.AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[a2a.AgentSkill(id="echo", name="Echo", description="Echoes", tags=["bench"])],
    )
    handler = DefaultRequestHandler(Echo(), InMemoryTaskStore(), card)
    app = Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/a2a")])
    config = uvicorn.Config(app, host="127.0.0.1", port=int(port), log_level="warning", lifespan="off", loop="none")
    await uvicorn.Server(config).serve()


async def inbox_replier(address: str) -> None:
    """The mesh path's local agent: holds a StreamInbox and answers each delivery with a reply (in_reply_to) of the
    same parts, then acks it; its token comes in BENCH_AGENT_TOKEN."""
    md = bearer(os.environ[TOKEN_VAR])
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = mpb_grpc.MessagingServiceStub(channel)
        acks: set[asyncio.Task[Any]] = set()
        async for delivery in stub.StreamInbox(mpb.StreamInboxRequest(max_in_flight=100), metadata=md):
            reply = mpb.Message(in_reply_to=delivery.message.id, parts=delivery.message.parts)
            await stub.SendMessage(mpb.SendMessageRequest(message=reply), metadata=md, timeout=CALL_TIMEOUT)
            ack = mpb.AckMessageRequest(message_id=delivery.message.id, receipt=delivery.receipt)
            task = asyncio.ensure_future(stub.AckMessage(ack, metadata=md, timeout=CALL_TIMEOUT))
            acks.add(task)
            task.add_done_callback(acks.discard)


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.messaging_bench", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def a2a_exchanges(
    base: str, token: str, warmup: int, rounds: int, meter: CpuMeter
) -> tuple[list[float], dict[str, float]]:
    """Seconds per blocking SendMessage from an a2a-sdk client at `base` (the agent, or the edge's endpoint of
    one), one call in flight; each answer checked (the same text back). Waits for the agent first."""
    import httpx
    from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
    from a2a.types import a2a_pb2 as a2a

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=CALL_TIMEOUT) as http:
        deadline = time.monotonic() + 60
        while True:
            try:
                card = await A2ACardResolver(http, base).get_agent_card()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)

        def answer(events: list[a2a.StreamResponse]) -> str:
            # Direct: the agent's Message; through the mesh: the task, completed, its status message the reply.
            [event] = events
            if event.HasField("message"):
                return str(event.message.parts[0].text)
            if event.task.status.state != a2a.TASK_STATE_COMPLETED:
                raise RuntimeError(f"the task is {a2a.TaskState.Name(event.task.status.state)}, not completed")
            return str(event.task.status.message.parts[0].text)

        async def exchange() -> float:
            request = a2a.SendMessageRequest(
                message=a2a.Message(message_id=str(uuid.uuid4()), role=a2a.ROLE_USER, parts=[a2a.Part(text=TEXT)])
            )
            started = time.perf_counter()
            events = [e async for e in client.send_message(request)]
            elapsed = time.perf_counter() - started
            if answer(events) != TEXT:
                raise RuntimeError("the answer does not carry the parts sent")
            return elapsed

        # The first answer may wait for the local agent's stream to open; retried until one comes complete.
        while True:
            try:
                await exchange()
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        for _ in range(warmup):
            await exchange()
        cpu: dict[str, float] = {}
        with meter.window(cpu):
            timings = [await exchange() for _ in range(rounds)]
        await client.close()
    return timings, cpu


def a2a_comparison(mesh: Mesh, sender: LocalAgent, replier: LocalAgent, config: Config, rounds: int) -> list[Figure]:
    """(a) direct to an a2a-sdk agent, (b) through the edge to a local agent on a StreamInbox; both p50/p99 and the
    difference of the p50s against the goal."""
    warmup = max(20, rounds // 10)
    port = str(free_port())
    server_cpus = set(config.server_cpus or ())
    with pinned(server_cpus):
        direct_agent = _spawn(A2A_ECHO_ROLE, port)
        local_agent = _spawn(INBOX_REPLIER_ROLE, mesh.address("messaging"), env={TOKEN_VAR: replier.token})
    try:
        figures: list[Figure] = []
        paths = (
            ("(a) direct to an a2a-sdk agent", f"http://127.0.0.1:{port}", "", {"agent": [direct_agent.pid]}),
            (
                "(b) through the mesh to a local agent",
                mesh.url(f"/a2a/agents/{replier.id}"),
                sender.token,
                {name: [mesh.processes[name].pid] for name in ("edge", "messaging")} | {"agent": [local_agent.pid]},
            ),
        )
        for name, base, token, groups in paths:
            meter = CpuMeter({"client": [os.getpid()], **groups}, {})
            with pinned(set(config.client_cpus or ())):
                timings, cpu = on_uvloop(a2a_exchanges(base, token, warmup, rounds, meter))
            ordered = sorted(timings)
            figure = Figure(
                "A2A",
                f"A2A blocking SendMessage c=1, {name}",
                throughput=len(timings) / sum(timings),
                p50_ms=percentile(ordered, 0.5) * 1000,
                p99_ms=percentile(ordered, 0.99) * 1000,
                cpu=cpu,
                note=f"{rounds} exchanges after {warmup}",
            )
            _show(figure)
            figures.append(figure)
        direct, meshed = figures
        overhead = (meshed.p50_ms or 0.0) - (direct.p50_ms or 0.0)
        meshed.extra["overhead_p50_ms"] = overhead
        meshed.note += (
            f"; p50 {overhead:+.2f} ms over direct (p99 {(meshed.p99_ms or 0.0) - (direct.p99_ms or 0.0):+.2f} ms)"
        )
        judge(meshed, f"p50 <= direct + {A2A_OVERHEAD_P50_MS:g} ms ({overhead:+.2f})", overhead <= A2A_OVERHEAD_P50_MS)
        return figures
    finally:
        _stop(local_agent)
        _stop(direct_agent)


def durable_floor(
    runner: Runner,
    dsn: str,
    requests: tuple[bytes, ...],
    concurrency: int,
    config: Config,
    groups: dict[str, list[int]],
    expand: dict[str, int],
) -> Figure:
    """bench/echo.py --durable, pinned as the messaging service is, driven like the sends: the least a service can do
    before it answers that a message is stored (parse it, one INSERT into an indexed table, commit, answer)."""
    port = free_port()
    with pinned(set(config.server_cpus or ())):
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.echo", str(port), "--durable", dsn], cwd=REPO, stdin=subprocess.DEVNULL
        )
    try:
        wait_for_port("127.0.0.1", port, 30, process)
        job = runner.grpc_job(f"127.0.0.1:{port}", DURABLE_METHOD, requests, concurrency)
        server_groups = {"server": [process.pid], **{k: v for k, v in groups.items() if k == "db"}}
        figure = runner.measure(SECTION, f"ceiling: gRPC echo + one INSERT c={concurrency}", job, server_groups, expand)
        runner.figures.remove(figure)
        return figure
    finally:
        _stop(process)


def ratio_note(figure: Figure, echo: Figure, loop: Figure) -> float:
    share = (figure.throughput or 0.0) / max(echo.throughput or 1.0, 1.0)
    of_loop = (figure.throughput or 0.0) / max(loop.throughput or 1.0, 1.0)
    figure.extra.update(share_of_echo=share, share_of_redis_loop=of_loop)
    text = f"{share:.1%} of the gRPC echo, {of_loop:.1%} of the redis stream loop (same run)"
    figure.note = f"{text}; {figure.note}" if figure.note else text
    return share


def run(config: Config, plan: Plan) -> int:
    info = machine()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}; "
          f"load average at start {info['load_average_at_start']}")  # fmt: skip
    print(f"concurrency {config.concurrency} over {config.channels} channels; {config.warmup:g} s warm-up + "
          f"{config.duration:g} s per throughput measurement; paced {plan.rate:g}/s for {plan.stream_seconds:g} s; "
          f"{plan.queued:,} queued, {plan.receivers} receivers", flush=True)  # fmt: skip
    split = (
        "no pinning"
        if not config.server_cpus or not config.client_cpus
        else f"load client and the bench's own loops on CPU {sorted(config.client_cpus)}; echo and messaging on CPU "
        f"{sorted(config.server_cpus)}; registry, PostgreSQL and Redis unpinned"
    )
    print(f"CPU split: {split}", flush=True)
    client = LoadClient(set(config.client_cpus) if config.client_cpus else None)
    runner = Runner(config, client)
    ceilings = Ceilings(config, runner)
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    c = config.concurrency
    try:
        with tempfile.TemporaryDirectory(prefix="agentvault-messaging-") as tmp, infrastructure(Path(tmp)) as infra:
            postgres, redis = infra
            asyncio.run(_create_database(postgres.uri(), "bench"))
            admin_token = "bench-admin-" + secrets.token_urlsafe(16)
            metrics_port = free_port()
            env = {
                "DATABASE_URL": postgres.uri("bench"),
                "REDIS_URL": redis.url(0),
                "AGENTVAULT_ADMIN_TOKEN": admin_token,
                "AGENTVAULT_DATA_DIR": str(Path(tmp) / "data"),
                "MESSAGING_METRICS_PORT": str(metrics_port),
                # The OAuth authorization server's signing keys are encrypted with it.
                "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
                # A full run lasts longer than the default 15 minutes of an access token on a slow machine.
                "OAUTH_ACCESS_TOKEN_TTL": "3600",
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "WARNING",
            }
            # The edge (started for the A2A comparison only) is the issuer: agent cards name its A2A endpoint.
            edge_port = free_port()
            env |= {"EDGE_PORT": str(edge_port), "OAUTH_ISSUER": f"http://127.0.0.1:{edge_port}"}
            services = tuple(s for s in SERVICES if s.name in ("registry", "messaging", "edge"))
            mesh = Mesh(env, log_dir=Path(tmp) / "logs", services=services)
            try:
                mesh.start_service("registry", timeout=60)
                agents = asyncio.run(
                    prepare(mesh.address("registry"), admin_token, ("sender", "sink", "live", "queue", "replier"))
                )
                with pinned(set(config.server_cpus or ())):
                    mesh.start_service("messaging", timeout=60)
                address = mesh.address("messaging")
                asyncio.run(wait_until_sends_pass(address, agents["sender"], agents["sink"].id))
                postmaster = postmaster_pid(Path(tmp) / "pg")
                redis_pid = redis._process.pid if redis._process else 0
                groups: dict[str, list[int]] = {
                    "messaging": [mesh.processes["messaging"].pid],
                    "registry": [mesh.processes["registry"].pid],
                    "redis": [redis_pid],
                }
                expand = {"db": postmaster} if postmaster else {}
                if postmaster:
                    groups["db"] = [postmaster]
                scrape = Scrape(f"http://127.0.0.1:{metrics_port}/metrics")
                profiler = Profiler(plan.profile, mesh.processes["messaging"].pid)
                own = CpuMeter({"client": [os.getpid()], **groups}, expand)

                # 1. Ceilings.
                echo = ceilings.echo(SECTION, c)
                with pinned(set(config.client_cpus or ())):
                    loop = on_uvloop(
                        redis_stream_loop(redis.url(1), c, config.warmup, config.duration, CpuMeter(
                            {"client": [os.getpid()], "redis": [redis_pid]}, {}))
                    )  # fmt: skip
                figures += [echo, loop]

                # 2. Durable sends, the load client as for the echo.
                requests = tuple(
                    mpb.SendMessageRequest(message=text_message(agents["sink"].id)).SerializeToString()
                    for _ in range(16)
                )
                # The floor of a durable send: the bare echo server committing each request in one indexed row.
                floor = durable_floor(runner, postgres.uri("bench"), requests, c, config, groups, expand)
                floor.note = (
                    f"{(floor.throughput or 0.0) / max(echo.throughput or 1.0, 1.0):.1%} of the gRPC echo (same run)"
                )
                figures.append(floor)
                job = runner.grpc_job(address, SEND_METHOD, requests, c)
                job = GrpcJob(job.address, job.method, job.requests, job.concurrency, job.channels, job.warmup,
                              job.duration, metadata=(agents["sender"].md,))  # fmt: skip
                labels = {"grpc_service": MESSAGING_SERVICE, "grpc_method": "SendMessage"}
                with profiler.phase("send", config.warmup + config.duration):
                    sends = runner.measure(SECTION, f"SendMessage to an inbox c={c}", job, groups, expand,
                                           (scrape.url, labels))  # fmt: skip
                runner.figures.remove(sends)
                share = ratio_note(sends, echo, loop)
                of_floor = (sends.throughput or 0.0) / max(floor.throughput or 1.0, 1.0)
                sends.extra["share_of_durable_floor"] = of_floor
                sends.note += f"; {of_floor:.1%} of the durable-send floor"
                judge(sends, f">= {SEND_VS_ECHO:.0%} of echo ({share:.0%})", share >= SEND_VS_ECHO)
                hist = sends.extra.get("server_histogram", {})
                if hist:
                    sends.note += (
                        f"; at the service p50 {hist['p50_ms']:.2f} ms, p99 {hist['p99_ms']:.2f} ms; messaging CPU "
                        f"{sends.cpu.get('messaging', 0) / 100 / max(sends.throughput or 1, 1) * 1e6:.0f} us per send"
                    )
                figures.append(sends)

                # 3. Send-to-delivery on a stream, paced.
                with pinned(set(config.client_cpus or ())):
                    for rate, goal in ((plan.low_rate, False), (plan.rate, True)):
                        if rate <= 0:
                            continue
                        paced = send_to_delivery(address, agents["sender"], agents["live"], rate, plan.stream_seconds,
                                                 config.warmup, own, scrape, goal)  # fmt: skip
                        with profiler.phase(f"stream-{rate:g}", config.warmup + plan.stream_seconds + 1):
                            figures += on_uvloop(paced)

                # 4. Drain.
                with pinned(set(config.client_cpus or ())):
                    filled = on_uvloop(fill(address, agents["sender"], agents["queue"].id, plan.queued, c,
                                              config.channels))  # fmt: skip
                    ratio_note(filled, echo, loop)
                    figures.append(filled)
                    details["queued_before_drain"] = asyncio.run(inbox_statuses(env["DATABASE_URL"],
                                                                                agents["queue"].id))  # fmt: skip
                    with profiler.phase("drain", 20):
                        drained = on_uvloop(drain(address, agents["queue"], plan.queued, plan.receivers, own, scrape))
                    ratio_note(drained[0], echo, loop)
                    figures += drained
                    details["after_drain"] = asyncio.run(inbox_statuses(env["DATABASE_URL"], agents["queue"].id))
                print(f"  inbox before the drain: {details['queued_before_drain']}; after: {details['after_drain']}",
                      flush=True)  # fmt: skip

                # 5. A2A through the mesh vs direct.
                if plan.a2a_rounds > 0:
                    with pinned(set(config.server_cpus or ())):
                        mesh.start_service("edge", timeout=60)
                    figures += a2a_comparison(mesh, agents["sender"], agents["replier"], config, plan.a2a_rounds)
            finally:
                mesh.stop()
    finally:
        ceilings.close()
        client.close()

    print("\n" + table(figures))
    print("CPU here: mes = messaging, reg = registry, red = Redis, ser = the echo server; cli = the load client for "
          "the echo and SendMessage rows, the bench's own process for the others")  # fmt: skip
    goals = {"send_vs_echo": SEND_VS_ECHO, "stream_p50_ms": STREAM_P50_MS, "stream_p99_ms": STREAM_P99_MS,
             "drain_per_s": DRAIN_PER_S, "a2a_overhead_p50_ms": A2A_OVERHEAD_P50_MS}  # fmt: skip
    payload = {
        "machine": info,
        "config": {**asdict(config), "cpu_split": split},
        "plan": asdict(plan),
        "goals": goals,
        "details": details,
        "load_average_at_end": list(os.getloadavg()),
    }
    write_json(config.output, payload, figures)
    print(f"\nfigures written to {config.output}")
    return 0


def main() -> None:
    # The A2A comparison's own processes: the direct agent, the local agent (their pinning is their parent's).
    if sys.argv[1:2] == [A2A_ECHO_ROLE]:
        run_loop(a2a_echo_agent(sys.argv[2]))
        return
    if sys.argv[1:2] == [INBOX_REPLIER_ROLE]:
        with contextlib.suppress(KeyboardInterrupt, grpc.aio.AioRpcError):
            run_loop(inbox_replier(sys.argv[2]))
        return
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    config, plan = parse()
    with sigterm_as_interrupt():
        sys.exit(run(config, plan))


if __name__ == "__main__":
    main()
