"""The load client: one long-lived process, spawned on its own CPU, that drives gRPC or HTTP calls on request.

The parent sends a job over a pipe and gets a LoadResult back. The same client drives the echo ceiling, the
registry and the edge, so their figures compare. Requests are sent pre-serialized and responses are kept as
raw bytes: the client then spends as little CPU per call as gRPC allows and the server side is what is measured.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.procs import run_loop

# Several channels, each its own TCP connection: one HTTP/2 connection would serialize on one socket.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]
CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class GrpcJob:
    """Unary calls to `method` ("/package.Service/Method"), cycling through pre-serialized requests."""

    address: str
    method: str
    requests: tuple[bytes, ...]
    concurrency: int
    channels: int
    warmup: float
    duration: float
    # Metadata sent with each request (cycled with the requests, e.g. one credential per caller); none when empty.
    metadata: tuple[tuple[tuple[str, str], ...], ...] = ()


@dataclass(frozen=True)
class HttpJob:
    """Requests (GET unless `method` says otherwise), cycling through `paths` under `base_url`, with `bodies` and
    `headers` cycled alongside when given."""

    base_url: str
    paths: tuple[str, ...]
    concurrency: int
    warmup: float
    duration: float
    method: str = "GET"
    bodies: tuple[bytes, ...] = ()
    headers: tuple[tuple[tuple[str, str], ...], ...] = ()


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    elapsed: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_response_bytes: float
    error_sample: str = ""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..1); 0 for no values."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(q * len(sorted_values) + 0.999999) - 1))
    return sorted_values[index]


# One call: takes the request index, returns (response size, error text or "").
Call = Callable[[int], Awaitable[tuple[int, str]]]


async def drive(call: Call, count: int, concurrency: int, warmup: float, duration: float) -> LoadResult:
    """Keeps `concurrency` calls in flight for warmup + duration seconds; measures calls started after warm-up."""
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration
    latencies: list[float] = []
    sizes = 0
    errors = 0
    error_sample = ""
    last_done = measure_from

    async def worker(first: int) -> None:
        nonlocal sizes, errors, error_sample, last_done
        i = first
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            size, error = await call(i % count)
            t1 = time.perf_counter()
            i += concurrency
            if t0 < measure_from:
                continue
            last_done = max(last_done, t1)
            if error:
                errors += 1
                error_sample = error_sample or error
            else:
                latencies.append(t1 - t0)
                sizes += size

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    latencies.sort()
    elapsed = max(last_done - measure_from, 1e-9)
    done = len(latencies)
    return LoadResult(
        requests=done,
        errors=errors,
        elapsed=elapsed,
        throughput=done / elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p90_ms=percentile(latencies, 0.90) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=(latencies[-1] * 1000) if latencies else 0.0,
        mean_response_bytes=sizes / done if done else 0.0,
        error_sample=error_sample[:300],
    )


async def run_grpc(job: GrpcJob) -> LoadResult:
    import grpc

    channels = [grpc.aio.insecure_channel(job.address, options=CHANNEL_OPTIONS) for _ in range(job.channels)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        # Identity (de)serializers: the request is already bytes and the response stays bytes.
        stubs: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            ch.unary_unary(job.method, request_serializer=None, response_deserializer=None) for ch in channels
        ]
        requests = job.requests
        metadata = job.metadata

        async def call(i: int) -> tuple[int, str]:
            try:
                md = metadata[i % len(metadata)] if metadata else None
                reply = await stubs[i % len(stubs)](requests[i], timeout=CALL_TIMEOUT, metadata=md)
            except grpc.aio.AioRpcError as exc:
                return 0, f"{exc.code().name}: {exc.details()}"
            return len(reply), ""

        return await drive(call, len(requests), job.concurrency, job.warmup, job.duration)
    finally:
        for channel in channels:
            await channel.close()


async def run_http(job: HttpJob) -> LoadResult:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=job.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    async with aiohttp.ClientSession(job.base_url, connector=connector, timeout=timeout) as session:
        paths, method, bodies, headers = job.paths, job.method, job.bodies, job.headers
        count = max(len(paths), len(bodies), len(headers))

        async def call(i: int) -> tuple[int, str]:
            try:
                body = bodies[i % len(bodies)] if bodies else None
                head = dict(headers[i % len(headers)]) if headers else None
                async with session.request(method, paths[i % len(paths)], data=body, headers=head) as response:
                    body = await response.read()
                    if response.status != 200:
                        return 0, f"HTTP {response.status}: {body[:200]!r}"
                    return len(body), ""
            except (aiohttp.ClientError, TimeoutError) as exc:
                return 0, f"{type(exc).__name__}: {exc}"

        return await drive(call, count, job.concurrency, job.warmup, job.duration)


def _serve(conn: Connection, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await loop.run_in_executor(None, conn.recv)
            if job is None:
                return
            try:
                result: LoadResult | str = await (run_grpc(job) if isinstance(job, GrpcJob) else run_http(job))
            except Exception as exc:  # reported to the parent, which decides what to do
                result = f"{type(exc).__name__}: {exc}"
            conn.send(result)

    run_loop(main())


class LoadClient:
    """The parent's handle on the client process."""

    def __init__(self, cpus: set[int] | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, cpus), name="bench-load-client", daemon=True)
        self._process.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def submit(self, job: GrpcJob | HttpJob) -> None:
        self._conn.send(job)

    def result(self, timeout: float) -> LoadResult:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"load client gave no result within {timeout:.0f}s")
        result = self._conn.recv()
        if isinstance(result, str):
            raise RuntimeError(f"load client failed: {result}")
        assert isinstance(result, LoadResult)
        return result

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()
