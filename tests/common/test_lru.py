"""The bounded LRU mapping behind every in-process memo."""

from __future__ import annotations

from agentvault.common.lru import Lru


def test_the_least_recently_used_entry_goes_first() -> None:
    lru: Lru[str, int] = Lru(2)
    assert lru.put("a", 1) == 1
    lru.put("b", 2)
    assert lru.get("a") == 1  # "a" is now the most recently used
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3)
    assert len(lru) == 2


def test_rewriting_refreshes_and_pop_and_clear_forget() -> None:
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 10)
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b")) == (10, None)
    lru.pop("a")
    lru.pop("missing")
    assert lru.get("a") is None and len(lru) == 1
    lru.clear()
    assert len(lru) == 0
