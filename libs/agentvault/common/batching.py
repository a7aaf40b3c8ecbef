"""A bounded background queue that writes items in batches, off the request path.

Used for rows that record what happened (query logs, mirrored cache rows) rather than for writes a caller is
told succeeded: a slow database then costs memory up to a limit, never latency. What does not fit is dropped
and counted; every failed write is logged, never swallowed; stop() writes what is queued before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from prometheus_client import Counter

log = logging.getLogger(__name__)

BATCH_DROPPED = Counter(
    "background_writes_dropped_total", "Background writes dropped because the queue was full.", ["writer"]
)
BATCH_FAILED = Counter(
    "background_write_errors_total", "Background batch writes that failed (logged with their error).", ["writer"]
)

T = TypeVar("T")


class BatchWriter(Generic[T]):
    """Calls `write(items)` with up to `batch` queued items at a time, and `tick()` (if given) every `tick_every`
    seconds; `name` labels the metrics and log lines. With `linger`, a batch waits that long after its first item
    for others to join it, so a steady trickle costs one write per `linger`, not one per item."""

    def __init__(
        self,
        name: str,
        write: Callable[[list[T]], Awaitable[None]],
        *,
        max_queue: int = 10_000,
        batch: int = 500,
        tick: Callable[[], Awaitable[None]] | None = None,
        tick_every: float = 60.0,
        linger: float = 0.0,
    ) -> None:
        self.name = name
        self._write = write
        self._tick = tick
        self._tick_every = tick_every
        self._linger = linger
        self._queue: asyncio.Queue[T] = asyncio.Queue(max_queue)
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._dropped = BATCH_DROPPED.labels(name)
        self._failed = BATCH_FAILED.labels(name)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"background-writer-{self.name}")

    def submit(self, item: T) -> bool:
        """Queues the item; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._dropped.inc()
            log.warning("background queue %s full; dropped a write", self.name)
            return False
        self._idle.clear()
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_tick = loop.time()
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=self._tick_every)
                items = [first]
                if self._linger and self._queue.qsize() < self._batch - 1:
                    await asyncio.sleep(self._linger)
            except TimeoutError:
                items = []
            while len(items) < self._batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            if items:
                await self._flush(items)
            if self._queue.empty():
                self._idle.set()
            if self._tick is not None and loop.time() - last_tick >= self._tick_every:
                last_tick = loop.time()
                try:
                    await self._tick()
                except Exception:
                    self._failed.inc()
                    log.exception("background task of %s failed", self.name)

    async def _flush(self, items: list[T]) -> None:
        try:
            await self._write(items)
        except Exception:
            self._failed.inc()
            log.exception("background write of %d item(s) to %s failed", len(items), self.name)

    async def drain(self, timeout: float = 5.0) -> None:
        """Waits until everything queued so far is written (shutdown, tests)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
