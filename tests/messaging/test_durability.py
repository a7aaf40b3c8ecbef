"""No acknowledged message is lost when a process is SIGKILLed under load: messaging, edge, Redis, PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import asyncpg
import grpc
import pytest

from agentvault.common.secretbox import SecretBox
from agentvault.devserver.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from agentvault.devserver.mesh import SERVICES, Mesh
from agentvault.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault.messaging.v1 import messaging_service_pb2_grpc as mpb_grpc
from agentvault.policy.v1 import policy_service_pb2_grpc as ppb_grpc
from agentvault.registry.v1 import registry_service_pb2_grpc as pb_grpc

from ..conftest import MeshHandle, auth, eventually
from .conftest import MESSAGING_ENV, LocalAgent, Net, local_agent, text_message

pytestmark = [pytest.mark.usefixtures("policies"), pytest.mark.slow]

# The services a message passes through; discovery and the health monitor play no part here.
MESH_SERVICES = tuple(s for s in SERVICES if s.name in ("registry", "messaging", "edge"))
DATABASE = "durability"
# Short, so a delivery whose receiver (or replica) died comes back within the drain.
VISIBILITY = 2
CALL_TIMEOUT = 5.0
SENDERS = 2
# Acked sends before the kill, and after the recovery, that show the load ran on both sides of it.
WARMUP = 20
# Calls the senders finish (either way) while a store is down: the outage was felt under load.
DURING_OUTAGE = 10
RECOVERY_SECONDS = 60.0
DRAIN_SECONDS = 30.0
# Between retries of a failed call: keeps a down process from turning the load into a busy loop.
RETRY_PAUSE = 0.05
# Reconnect quickly to a restarted process (gRPC's default backoff grows past the outage itself).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# ------------------------------------------------------------------------------------------ a private mesh


@dataclass
class Stores:
    """This module's own PostgreSQL and Redis: the tests kill them, so they cannot be the session's."""

    postgres: EmbeddedPostgres
    redis: EmbeddedRedis


@pytest.fixture(scope="module")
def stores() -> Iterator[Stores]:
    # Not pytest's tmp tree: it is private to root (0700), and PostgreSQL runs as its own user.
    root = Path(tempfile.mkdtemp(prefix="agentvault-durability-"))
    root.chmod(0o755)
    postgres = EmbeddedPostgres(root / "pg", delete_on_stop=True)
    redis = EmbeddedRedis(root / "redis")
    try:
        postgres.start()
        redis.start()
        yield Stores(postgres, redis)
    finally:
        redis.stop()
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def net(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Net]:
    """Replaces the messaging tests' mesh with one on this module's own stores (registry, messaging, edge)."""
    conn = await asyncpg.connect(stores.postgres.uri())
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    data_dir = tmp_path_factory.mktemp(DATABASE)
    token = "test-admin-" + secrets.token_urlsafe(16)
    env = {
        "DATABASE_URL": stores.postgres.uri(DATABASE),
        "REDIS_URL": stores.redis.url(0),
        "AGENTVAULT_ADMIN_TOKEN": token,
        "FEDERATION_ENCRYPTION_KEYS": SecretBox.generate_key(),
        "FEDERATION_REGISTRY_NAME": DATABASE,
        "AGENTVAULT_DATA_DIR": str(data_dir),
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "INFO",
        # Nothing listens there: the edge must not reach another mesh's services on their default ports.
        "DISCOVERY_PORT": str(free_port()),
        "HEALTH_MONITOR_PORT": str(free_port()),
        **MESSAGING_ENV,
        "MESSAGING_METRICS_PORT": str(free_port()),
    }
    mesh = Mesh(env, log_dir=data_dir / "logs", services=MESH_SERVICES)
    try:
        await asyncio.to_thread(mesh.start)
        async with (
            grpc.aio.insecure_channel(mesh.address("registry"), options=CHANNEL_OPTIONS) as reg,
            grpc.aio.insecure_channel(mesh.address("messaging"), options=CHANNEL_OPTIONS) as msg,
        ):
            yield Net(
                MeshHandle(mesh, env["DATABASE_URL"], env["REDIS_URL"], token),
                pb_grpc.RegistryServiceStub(reg),
                ipb_grpc.IdentityServiceStub(reg),
                ppb_grpc.PolicyServiceStub(reg),
                mpb_grpc.MessagingServiceStub(msg),
            )
    finally:
        await asyncio.to_thread(mesh.stop)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)) as session:
        yield session


# ------------------------------------------------------------------------------------------ the load


def aio(net: Net) -> mpb_grpc.MessagingServiceAsyncStub:
    """The mesh's messaging stub as what it is: made on an asyncio channel."""
    return cast("mpb_grpc.MessagingServiceAsyncStub", net.messaging)


def code_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    return type(exc).__name__


@dataclass
class Load:
    """What a sender and a receiver saw: every id sent, every id whose send was acknowledged, every delivery."""

    attempted: dict[str, str] = field(default_factory=dict)  # id -> its text
    acked: set[str] = field(default_factory=set)
    repeats: int = 0  # retried sends answered "duplicate": the first try was stored, its answer lost
    calls: int = 0  # send calls finished, either way
    delivered: Counter[str] = field(default_factory=Counter)  # id -> how many times received
    redelivered: int = 0  # deliveries with attempt > 1
    wrong: list[str] = field(default_factory=list)  # deliveries whose content is not what was sent
    errors: Counter[str] = field(default_factory=Counter)
    stop_sending: asyncio.Event = field(default_factory=asyncio.Event)
    stop_receiving: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.delivered.values())

    def summary(self) -> str:
        return (
            f"sent {len(self.attempted)}, acked {len(self.acked)} (repeats answered duplicate: {self.repeats}), "
            f"delivered {len(self.delivered)} distinct in {sum(self.delivered.values())} deliveries, "
            f"duplicates {self.duplicates} (redelivered attempts: {self.redelivered}), "
            f"errors {dict(self.errors)}"
        )


# One send of message `id` with `text`; true when it came back as a repeat of an earlier stored send.
Send = Callable[[str, str], Awaitable[bool]]


async def sender(load: Load, send: Send) -> None:
    """Sends until told to stop; a failed send is retried with the same id (the id is its idempotency key)."""
    while not load.stop_sending.is_set():
        message_id = str(uuid.uuid4())
        text = f"load {message_id}"
        load.attempted[message_id] = text
        while True:
            try:
                repeat = await send(message_id, text)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, TimeoutError, SendRefused) as exc:
                load.calls += 1
                load.errors[f"send {code_of(exc)}"] += 1
                if load.stop_sending.is_set():
                    break
                await asyncio.sleep(RETRY_PAUSE)
                continue
            load.calls += 1
            load.acked.add(message_id)
            load.repeats += repeat
            break


class SendRefused(Exception):
    """The edge answered a send with an HTTP error."""


def grpc_send(stubs: list[mpb_grpc.MessagingServiceAsyncStub], alice: LocalAgent, bob: LocalAgent) -> Send:
    """SendMessage, to each replica in turn."""
    turn = iter(range(1 << 62))

    async def send(message_id: str, text: str) -> bool:
        stub = stubs[next(turn) % len(stubs)]
        answer = await stub.SendMessage(
            mpb.SendMessageRequest(message=text_message(bob, text, id=message_id)),
            metadata=tuple(alice.md),
            timeout=CALL_TIMEOUT,
        )
        assert answer.message.id == message_id, (answer.message.id, message_id)
        return bool(answer.duplicate)

    return send


def http_send(http: aiohttp.ClientSession, url: str, alice: LocalAgent, bob: LocalAgent) -> Send:
    """POST /api/v1/messages through the edge."""

    async def send(message_id: str, text: str) -> bool:
        body = {"id": message_id, "recipient": {"agentId": bob.id}, "parts": [{"text": text}]}
        async with http.post(url + "/api/v1/messages", json=body, headers=auth(alice.token)) as response:
            if response.status != 200:
                raise SendRefused(f"HTTP {response.status}: {(await response.text())[:200]}")
            answer = await response.json()
        assert answer["message"]["id"] == message_id, (answer, message_id)
        return bool(answer.get("duplicate", False))

    return send


async def receiver(load: Load, stubs: list[mpb_grpc.MessagingServiceAsyncStub], bob: LocalAgent) -> None:
    """Takes bob's inbox and acks each delivery, from each replica in turn, through any outage."""
    turn = 0
    while not load.stop_receiving.is_set():
        stub = stubs[turn % len(stubs)]
        turn += 1
        try:
            answer = await stub.ReceiveMessages(
                mpb.ReceiveMessagesRequest(max_messages=50, visibility_timeout_seconds=VISIBILITY, wait_seconds=1),
                metadata=tuple(bob.md),
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            load.errors[f"receive {code_of(exc)}"] += 1
            await asyncio.sleep(RETRY_PAUSE)
            continue
        for d in answer.deliveries:
            load.delivered[d.message.id] += 1
            load.redelivered += d.attempt > 1
            sent = load.attempted.get(d.message.id)
            if sent is not None and [p.text for p in d.message.parts] != [sent]:
                load.wrong.append(d.message.id)
        for d in answer.deliveries:
            try:
                await stub.AckMessage(
                    mpb.AckMessageRequest(message_id=d.message.id, receipt=d.receipt),
                    metadata=tuple(bob.md),
                    timeout=CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as exc:
                # Not acked: it comes again after its visibility timeout, a duplicate the receiver counts.
                load.errors[f"ack {code_of(exc)}"] += 1


@contextlib.asynccontextmanager
async def running(
    load: Load, send: Send, stubs: list[mpb_grpc.MessagingServiceAsyncStub], bob: LocalAgent
) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(sender(load, send)) for _ in range(SENDERS)]
    tasks.append(asyncio.create_task(receiver(load, stubs, bob)))
    try:
        yield
    finally:
        load.stop_sending.set()
        load.stop_receiving.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def acked_at_least(load: Load, count: int, seconds: float, what: str) -> None:
    async def check() -> None:
        assert len(load.acked) >= count and len(load.delivered) > 0, f"{what}: {load.summary()}"

    await eventually(check, seconds)


async def calls_at_least(load: Load, count: int, seconds: float, what: str) -> None:
    async def check() -> None:
        assert load.calls >= count, f"{what}: {load.summary()}"

    await eventually(check, seconds)


async def unsettled(net: Net, bob: LocalAgent) -> list[mpb.Message]:
    """Messages of bob's inbox not yet acknowledged (nor dead-lettered): a few of them, as an admin sees them."""
    found: list[mpb.Message] = []
    for status in ("accepted", "delivered"):
        page = await aio(net).ListMessages(
            mpb.ListMessagesRequest(agent_id=bob.id, status=status, page_size=5),
            metadata=tuple(net.admin),
            timeout=CALL_TIMEOUT,
        )
        found.extend(page.messages)
    return found


async def drained(net: Net, load: Load, bob: LocalAgent, logs: list[Path]) -> None:
    """Stops the senders, lets the receiver take what is left (deliveries whose ack was lost come again after their
    visibility timeout: the duplicates), then checks that nothing acknowledged was lost."""
    load.stop_sending.set()

    async def settled() -> None:
        assert load.acked <= set(load.delivered), "acknowledged sends not delivered yet"
        try:
            left = await unsettled(net, bob)
        except grpc.aio.AioRpcError as exc:
            raise AssertionError(f"cannot list the inbox: {exc.code().name}") from None
        assert not left, f"{len(left)}+ messages still in the inbox"

    with contextlib.suppress(AssertionError):
        await eventually(settled, DRAIN_SECONDS)
    load.stop_receiving.set()
    print(f"\n{load.summary()}")
    missing = sorted(load.acked - set(load.delivered))
    if missing:
        statuses = []
        for message_id in missing[:5]:
            try:
                m = await aio(net).GetMessage(
                    mpb.GetMessageRequest(id=message_id), metadata=tuple(net.admin), timeout=CALL_TIMEOUT
                )
                statuses.append(f"{message_id}: {m.status} after {m.attempts} attempts ({m.status_reason})")
            except grpc.aio.AioRpcError as exc:
                statuses.append(f"{message_id}: {exc.code().name} {exc.details()}")
        tails = "".join(_tail(path) for path in logs)
        raise AssertionError(
            f"{len(missing)} acknowledged messages never delivered; {load.summary()}\n" + "\n".join(statuses) + tails
        )
    assert set(load.delivered) <= set(load.attempted), f"delivered but never sent: {load.summary()}"
    left = await unsettled(net, bob)
    assert not left, "never delivered again, though not acknowledged: " + ", ".join(
        f"{m.id} {m.status} after {m.attempts} attempts" for m in left
    )
    assert not load.wrong, f"{len(load.wrong)} deliveries with other content than sent: {load.wrong[:5]}"


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"\n--- {path} ---\n" + "\n".join(text)
    return ""


def log_of(net: Net, name: str) -> Path:
    assert net.mesh.mesh.log_dir is not None
    return net.mesh.mesh.log_dir / f"{name}.log"


# ------------------------------------------------------------------------------------------ killing


def sigkill(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGKILL)
    return process.wait(10)


def kill_service(mesh: Mesh, name: str) -> None:
    code = sigkill(mesh.processes[name])
    assert code == -signal.SIGKILL, f"{name} exited with {code}"
    mesh.stop_service(name)  # forgets the dead process and closes its log


def kill_postgres(postgres: EmbeddedPostgres) -> None:
    """The postmaster and every backend at once, frozen first so none reacts to another's death (each backend
    leads a session of its own, so not by group): a crash with no flush and no checkpoint; whatever was committed
    must come back from the WAL."""
    process = postgres.process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # forks no new backend from here on
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == process.pid:
                    children.append(int(entry.name))
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGSTOP)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    code = sigkill(process)
    assert code == -signal.SIGKILL, f"PostgreSQL exited with {code}"


# ------------------------------------------------------------------------------------------ the tests


async def test_a_killed_messaging_replica_loses_no_acknowledged_message(net: Net) -> None:
    """Two replicas share one inbox; one is SIGKILLed with sends and deliveries in flight on it."""
    alice, bob = await local_agent(net), await local_agent(net)
    mesh = net.mesh.mesh
    spec = mesh.spec("messaging")
    assert mesh.log_dir is not None
    env = dict(mesh.env, MESSAGING_PORT=str(free_port()), MESSAGING_METRICS_PORT=str(free_port()))
    replica = Mesh(env=env, log_dir=mesh.log_dir / "replica-2", services=(spec,))
    replica_log = mesh.log_dir / "replica-2" / "messaging.log"
    await asyncio.to_thread(replica.start)
    load = Load()
    try:
        async with grpc.aio.insecure_channel(replica.address("messaging"), options=CHANNEL_OPTIONS) as second:
            stubs = [aio(net), mpb_grpc.MessagingServiceStub(second)]
            async with running(load, grpc_send(stubs, alice, bob), stubs, bob):
                await acked_at_least(load, WARMUP, RECOVERY_SECONDS, "load before the kill")
                # Deliveries the killed replica made whose answer never reached a receiver (taken, never acked):
                # they must come again, through the survivor, once their visibility timeout ends.
                lost = await aio(net).ReceiveMessages(
                    mpb.ReceiveMessagesRequest(max_messages=10, visibility_timeout_seconds=VISIBILITY, wait_seconds=5),
                    metadata=tuple(bob.md),
                    timeout=CALL_TIMEOUT,
                )
                in_flight = {d.message.id for d in lost.deliveries}
                assert in_flight, "nothing in flight on the replica about to be killed"
                await asyncio.to_thread(kill_service, mesh, "messaging")
                # The survivor carries the load alone while the killed replica starts again.
                await asyncio.to_thread(mesh.start_service, "messaging")
                await acked_at_least(load, len(load.acked) + WARMUP, RECOVERY_SECONDS, "load after the restart")
                await drained(net, load, bob, [log_of(net, "messaging"), replica_log])
                assert in_flight <= set(load.delivered), (
                    f"lost with the killed replica: {in_flight - set(load.delivered)}"
                )
    finally:
        await asyncio.to_thread(replica.stop)


async def test_a_killed_edge_loses_no_acknowledged_message(net: Net, http: aiohttp.ClientSession) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    mesh = net.mesh.mesh
    load = Load()
    async with running(load, http_send(http, mesh.url(), alice, bob), [aio(net)], bob):
        await acked_at_least(load, WARMUP, RECOVERY_SECONDS, "load before the kill")
        await asyncio.to_thread(kill_service, mesh, "edge")
        await asyncio.to_thread(mesh.start_service, "edge")
        await acked_at_least(load, len(load.acked) + WARMUP, RECOVERY_SECONDS, "load after the restart")
        await drained(net, load, bob, [log_of(net, "edge"), log_of(net, "messaging")])


async def test_a_killed_redis_loses_no_acknowledged_message(net: Net, stores: Stores) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    load = Load()
    async with running(load, grpc_send([aio(net)], alice, bob), [aio(net)], bob):
        await acked_at_least(load, WARMUP, RECOVERY_SECONDS, "load before the kill")
        assert stores.redis.process is not None
        assert await asyncio.to_thread(sigkill, stores.redis.process) == -signal.SIGKILL
        await calls_at_least(load, load.calls + DURING_OUTAGE, RECOVERY_SECONDS, "sends while Redis is down")
        await asyncio.to_thread(stores.redis.restart)
        await acked_at_least(load, len(load.acked) + WARMUP, RECOVERY_SECONDS, "load after the restart")
        await drained(net, load, bob, [log_of(net, "messaging"), log_of(net, "registry")])


async def test_a_killed_postgres_loses_no_acknowledged_message(net: Net, stores: Stores) -> None:
    alice, bob = await local_agent(net), await local_agent(net)
    load = Load()
    async with running(load, grpc_send([aio(net)], alice, bob), [aio(net)], bob):
        await acked_at_least(load, WARMUP, RECOVERY_SECONDS, "load before the kill")
        await asyncio.to_thread(kill_postgres, stores.postgres)
        await calls_at_least(load, load.calls + DURING_OUTAGE, RECOVERY_SECONDS, "sends while PostgreSQL is down")
        await asyncio.to_thread(stores.postgres.restart)
        await acked_at_least(load, len(load.acked) + WARMUP, RECOVERY_SECONDS, "load after the restart")
        await drained(net, load, bob, [log_of(net, "messaging"), log_of(net, "registry"), stores.postgres.log_path])
