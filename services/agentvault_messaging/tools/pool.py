"""Open MCP client sessions kept per (agent, endpoint, credentials) and shared by InvokeTool's calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

from agentvault.common.agent_auth import PreparedAuth
from agentvault_messaging.tools.mcp_client import open_session

log = logging.getLogger(__name__)

T = TypeVar("T")
# (agent id, MCP URL, credentials' fingerprint): a registration whose endpoint or credentials change gets new sessions.
Key = tuple[str, str, str]
# How a request refused with 404 for an unknown session id (the server restarted, or dropped the session) ends: the
# server's JSON-RPC error (the SDK's servers), or the SDK client's stand-in for a 404 without one. Refused unprocessed,
# so a fresh session may send it again.
SESSION_GONE = ("Session not found", "Session terminated")


@dataclass(eq=False)
class _Entry:
    key: Key
    opened: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0
    session: Any = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    failure: BaseException | None = None
    # Connections the transport could not open: a request whose POST never connected was never sent.
    connect_failures: int = 0
    # Requests the server refused (404) for not knowing the session.
    unknown: int = 0
    dead: bool = False
    task: asyncio.Task[None] | None = None


class SessionPool:
    """At most `max_sessions` open sessions in all, each carrying at most `per_session` calls at a time (MCP
    multiplexes requests on a session); one unused for `idle_seconds`, or older than `max_age_seconds` (its headers,
    an OAuth token among them, were fixed when it opened), is closed. A call waits for room when all are busy."""

    def __init__(
        self,
        *,
        block_private: bool,
        max_sessions: int = 64,
        per_session: int = 16,
        idle_seconds: float = 60.0,
        max_age_seconds: float = 300.0,
    ) -> None:
        self.block_private = block_private
        self.max_sessions = max_sessions
        self.per_session = per_session
        self.idle_seconds = idle_seconds
        self.max_age_seconds = max_age_seconds
        self._entries: list[_Entry] = []
        self._room = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        # Sessions opened, for the tests and metrics.
        self.opened = 0

    async def call(
        self, agent_id: str, url: str, prepared: PreparedAuth, fn: Callable[[Any], Awaitable[T]], deadline: float
    ) -> T:
        """`fn(session)` on a pooled session of this agent. A session that fails is dropped; the call is sent again,
        once, on a fresh session only when it provably never reached the tool (its connection was never made, or the
        server no longer knew the session), so a tool never runs twice. Cancelling the call (the SDK then tells the
        server, notifications/cancelled) leaves the session to the others."""
        key = (agent_id, url, prepared.fingerprint)
        self._retire_others(key)
        for attempt in (0, 1):
            entry = await self._acquire(key, prepared, deadline)
            before, refused = entry.connect_failures, entry.unknown
            alone = entry.inflight == 1
            try:
                return await fn(entry.session)
            except asyncio.CancelledError:
                raise
            except MCPError as exc:
                gone = entry.unknown > refused and exc.error.message in SESSION_GONE
                if not gone and exc.error.code != CONNECTION_CLOSED:
                    raise  # the server's own answer to the call: the session is fine
                # The transport failed (a POST that could not connect ends the SDK's session) or the server forgot it.
                self._drop(entry)
                if attempt or not (gone or (alone and entry.connect_failures > before)):
                    raise ConnectionError(f"the MCP session was lost: {exc.error.message}"[:300]) from None
            except Exception:
                self._drop(entry)
                # Only a call alone on its session can claim the connect failure as its own.
                if attempt or not (alone and entry.connect_failures > before):
                    raise
            finally:
                await self._release(entry)
            log.info(
                "MCP session lost before the call was sent: once more on a fresh one", extra={"agent_id": agent_id}
            )
        raise AssertionError("unreachable")

    async def close_agent(self, agent_id: str) -> None:
        """Closes the agent's sessions (deleted, or no longer an MCP server); calls on them end."""
        for entry in [e for e in self._entries if e.key[0] == agent_id]:
            self._drop(entry, now=True)

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        entries = list(self._entries)
        for entry in entries:
            self._drop(entry, now=True)
        for entry in entries:
            if entry.task is not None:
                with contextlib.suppress(BaseException):
                    await entry.task

    # ---------------------------------------------------------------------------------------------------------------

    def _usable(self, entry: _Entry, key: Key) -> bool:
        return (
            entry.key == key
            and not entry.dead
            and not entry.stop.is_set()
            and time.monotonic() - entry.opened < self.max_age_seconds
        )

    async def _acquire(self, key: Key, prepared: PreparedAuth, deadline: float) -> _Entry:
        if self._closed:
            raise RuntimeError("the MCP session pool is closed")
        self._start_reaper()
        async with self._room:
            while True:
                mine = [e for e in self._entries if self._usable(e, key)]
                free = [e for e in mine if e.inflight < self.per_session]
                if free:
                    entry = min(free, key=lambda e: e.inflight)
                    break
                if len(self._entries) >= self.max_sessions:
                    idle = [e for e in self._entries if e.inflight == 0]
                    if idle:  # the least recently used idle session makes room
                        self._drop(min(idle, key=lambda e: e.last_used), now=True)
                if len(self._entries) < self.max_sessions:
                    entry = self._open(key, prepared)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._room.wait()
            entry.inflight += 1
            entry.last_used = time.monotonic()
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await entry.ready.wait()
        except BaseException:
            await self._release(entry)
            raise
        if entry.failure is not None:
            await self._release(entry)
            raise entry.failure
        return entry

    def _open(self, key: Key, prepared: PreparedAuth) -> _Entry:
        entry = _Entry(key)
        self._entries.append(entry)
        self.opened += 1
        entry.task = asyncio.create_task(self._own(entry, prepared), name=f"mcp-session-{key[0]}")
        return entry

    async def _own(self, entry: _Entry, prepared: PreparedAuth) -> None:
        """Holds the session open in its own task (the SDK's task groups must end in the task that began them)."""

        def connect_failed() -> None:
            entry.connect_failures += 1

        def session_unknown() -> None:
            entry.unknown += 1

        try:
            async with open_session(
                entry.key[1],
                prepared,
                block_private=self.block_private,
                on_connect_error=connect_failed,
                on_session_unknown=session_unknown,
            ) as session:
                entry.session = session
                entry.ready.set()
                await entry.stop.wait()
        except asyncio.CancelledError:
            if not entry.ready.is_set():
                entry.failure = ConnectionError("the MCP session was closed before it opened")
        except Exception as exc:
            if not entry.ready.is_set():
                entry.failure = exc
            log.info(
                "MCP session ended", extra={"agent_id": entry.key[0], "error": f"{type(exc).__name__}: {exc}"[:300]}
            )
        finally:
            entry.dead = True
            entry.ready.set()
            with contextlib.suppress(ValueError):
                self._entries.remove(entry)

    def _drop(self, entry: _Entry, now: bool = False) -> None:
        """No new calls on it; closed once its calls end (or `now`, ending them)."""
        entry.dead = True
        with contextlib.suppress(ValueError):
            self._entries.remove(entry)
        if now or entry.inflight == 0:
            entry.stop.set()
            if entry.task is not None and not entry.ready.is_set():
                entry.task.cancel()

    def _retire_others(self, key: Key) -> None:
        """The agent's sessions with another endpoint or other credentials: its registration changed."""
        for entry in [e for e in self._entries if e.key[0] == key[0] and e.key != key]:
            self._drop(entry)

    async def _release(self, entry: _Entry) -> None:
        async with self._room:
            entry.inflight -= 1
            entry.last_used = time.monotonic()
            if entry.dead and entry.inflight == 0:
                entry.stop.set()
            self._room.notify_all()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="mcp-session-reaper")

    async def _reap(self) -> None:
        while self._entries:
            await asyncio.sleep(min(self.idle_seconds, self.max_age_seconds) / 4)
            now = time.monotonic()
            for entry in list(self._entries):
                if entry.inflight == 0 and (
                    now - entry.last_used >= self.idle_seconds or now - entry.opened >= self.max_age_seconds
                ):
                    self._drop(entry)
