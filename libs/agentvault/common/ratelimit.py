"""Per-minute call counts in Redis: one fixed window a minute per scope, counted inside the caller's own
pipeline so that a limit costs no round trip of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WINDOW_SECONDS = 60


@dataclass(frozen=True)
class MinuteWindow:
    """The current minute's counter of `scope` (e.g. "federation:rate:<credential id>")."""

    key: str
    ends_at: float

    @classmethod
    def of(cls, scope: str, now: float) -> MinuteWindow:
        window = int(now // WINDOW_SECONDS)
        return cls(f"{scope}:{window}", (window + 1) * WINDOW_SECONDS)

    def count(self, pipe: Any) -> None:
        """Adds this call to the window (two commands on `pipe`; the INCR's result is the count so far). The key
        outlives its minute by one more, so a late call still finds it."""
        pipe.incr(self.key)
        pipe.expire(self.key, 2 * WINDOW_SECONDS)

    def retry_after(self, now: float) -> int:
        """Whole seconds until the next window opens (at least 1)."""
        return max(1, int(self.ends_at - now) + 1)
