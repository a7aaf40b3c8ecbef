"""A bounded mapping that forgets its least recently used entries: the one shape of every in-process memo."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# What one entry costs beyond its value: the key, the OrderedDict node, the tuple around the value.
ENTRY_OVERHEAD = 256


class Lru(Generic[K, V]):
    """At most `size` entries and at most `budget` bytes; reading or writing one makes it the most recently used.

    Each entry is charged `weigh(value)` + ENTRY_OVERHEAD bytes (ENTRY_OVERHEAD alone without `weigh`), so what
    an outsider can put in (peers' answers, arbitrary queries) is bounded by memory, not by count. A value heavier
    than the whole budget is returned but not kept.
    """

    def __init__(self, size: int, *, budget: int | None = None, weigh: Callable[[V], int] | None = None) -> None:
        self.size = size
        self.budget = budget
        self._weigh = weigh
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        # Sum of the charges of the entries kept.
        self.bytes = 0

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, weight: int | None = None) -> V:
        """Keeps the value (evicting the least recently used beyond `size` or `budget`) and returns it; `weight`,
        when given, is what the value costs instead of what `weigh` says."""
        if weight is None:
            weight = self._weigh(value) if self._weigh is not None else 0
        charge = ENTRY_OVERHEAD + weight
        self.pop(key)
        if self.budget is not None and charge > self.budget:
            return value
        self._entries[key] = (value, charge)
        self.bytes += charge
        while len(self._entries) > self.size or (self.budget is not None and self.bytes > self.budget):
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
        return value

    def pop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def drop_if(self, doomed: Callable[[K], bool]) -> None:
        """Forgets every entry whose key `doomed` accepts."""
        for key in [k for k in self._entries if doomed(k)]:
            self.pop(key)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
