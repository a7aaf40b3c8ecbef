"""The background batch writer: batches, lingers, survives failing writes, drops (and counts) only when full,
and writes everything queued before it stops."""

from __future__ import annotations

import asyncio

from agentvault.common.batching import BATCH_DROPPED, BATCH_FAILED, BatchWriter


class Sink:
    def __init__(self, fail_first: int = 0, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.fail_first = fail_first
        self.delay = delay
        self.calls = 0

    async def write(self, items: list[int]) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.calls <= self.fail_first:
            raise RuntimeError("database went away")
        self.batches.append(items)


def counter(metric: object, name: str) -> float:
    return float(metric.labels(name)._value.get())  # type: ignore[attr-defined]


async def test_linger_gathers_a_trickle_into_one_write() -> None:
    sink = Sink()
    writer: BatchWriter[int] = BatchWriter("test-linger", sink.write, linger=0.2)
    writer.start()
    for i in range(5):
        writer.submit(i)
        await asyncio.sleep(0.01)
    await writer.stop()
    assert sink.batches == [[0, 1, 2, 3, 4]]


async def test_without_linger_items_are_written_as_they_come() -> None:
    sink = Sink()
    writer: BatchWriter[int] = BatchWriter("test-eager", sink.write)
    writer.start()
    for i in range(3):
        writer.submit(i)
        await writer.drain()
    await writer.stop()
    assert sink.batches == [[0], [1], [2]]


async def test_a_failing_write_is_counted_and_the_writer_goes_on() -> None:
    sink = Sink(fail_first=1)
    writer: BatchWriter[int] = BatchWriter("test-failing", sink.write)
    failed = counter(BATCH_FAILED, "test-failing")
    writer.start()
    writer.submit(1)
    await writer.drain()
    writer.submit(2)
    await writer.stop()
    assert sink.batches == [[2]]
    assert counter(BATCH_FAILED, "test-failing") == failed + 1


async def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    sink = Sink(delay=0.2)
    writer: BatchWriter[int] = BatchWriter("test-full", sink.write, max_queue=3, batch=2)
    dropped = counter(BATCH_DROPPED, "test-full")
    writer.start()
    accepted = [writer.submit(i) for i in range(10)]
    assert accepted == [True] * 3 + [False] * 7
    assert counter(BATCH_DROPPED, "test-full") == dropped + 7
    await writer.stop()
    assert [i for batch in sink.batches for i in batch] == [0, 1, 2]
    assert all(len(batch) <= 2 for batch in sink.batches)


async def test_tick_runs_on_schedule_even_when_idle() -> None:
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(asyncio.get_running_loop().time())

    writer: BatchWriter[int] = BatchWriter("test-tick", Sink().write, tick=tick, tick_every=0.05)
    writer.start()
    # No item is ever submitted: the ticks still come, one per interval.
    deadline = asyncio.get_running_loop().time() + 10
    while len(ticks) < 3 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    await writer.stop()
    assert len(ticks) >= 3
