"""Validation rules that everything written to the registry, and everything peers send, goes through."""

from __future__ import annotations

import unicodedata

from agentvault.common import agents as domain


def test_control_character_check_is_exactly_categories_cc_and_cs() -> None:
    for cp in range(0x10000):
        ch = chr(cp)
        control = unicodedata.category(ch) in ("Cc", "Cs")
        assert domain._has_control(ch) == control, hex(cp)
        assert domain._has_control(ch, allow_newlines=True) == (control and ch not in "\n\t\r"), hex(cp)
    assert domain._has_control("fine text, then a NUL\x00")
    assert not domain._has_control("line one\nline two\ttabbed", allow_newlines=True)
