"""The per-minute window both Redis rate limits count in (federation requests, force_refresh searches)."""

from __future__ import annotations

from agentvault.common.ratelimit import MinuteWindow


def test_one_key_per_scope_and_minute() -> None:
    first = MinuteWindow.of("federation:rate:abc", 120.0)
    assert first == MinuteWindow.of("federation:rate:abc", 179.9)
    assert first.key == "federation:rate:abc:2" and first.ends_at == 180.0
    assert MinuteWindow.of("federation:rate:abc", 180.0).key == "federation:rate:abc:3"
    assert MinuteWindow.of("federation:rate:xyz", 120.0).key != first.key


def test_retry_after_reaches_the_next_window() -> None:
    window = MinuteWindow.of("s", 125.0)
    assert window.retry_after(125.0) == 56
    assert window.retry_after(179.99) == 1
    assert window.retry_after(179.0) == 2
