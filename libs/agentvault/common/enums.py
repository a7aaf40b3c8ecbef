"""The one mapping between proto enum numbers and the lowercase words of the JSON API, the CLI and the domain.

An enum's word is its value name without the type's UPPER_SNAKE prefix, lowercased: CAPABILITY_KIND_SKILL <->
"skill", PROTOCOL_HTTP <-> "http", SHARING_FEDERATED <-> "federated". The prefix is derived from the type name
(CapabilityKind -> CAPABILITY_KIND_), which is also the prefix of every enum's `*_UNSPECIFIED` zero value as buf's
ENUM_ZERO_VALUE_SUFFIX and ENUM_VALUE_PREFIX rules require; tests/common/test_enums.py checks that both agree for
every enum in protos/.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Longer text is never a word of ours; refusing it early keeps a hostile peer from making us lowercase megabytes.
MAX_WORD_LENGTH = 64


def upper_snake(name: str) -> str:
    """CapabilityKind -> CAPABILITY_KIND; HTTPMethod -> HTTP_METHOD."""
    return _CAMEL_BOUNDARY.sub("_", name).upper()


@dataclass(frozen=True)
class EnumWords:
    """One enum's words. `to_word` covers every value (the zero value's word is "unspecified"); `words` lists the
    ones a caller may choose, without the zero value, which means "not set"."""

    name: str
    prefix: str
    to_word: Mapping[int, str]
    from_text: Mapping[str, int]
    words: tuple[str, ...]

    def word(self, number: int) -> str:
        """The word for a known non-zero number; "" for zero and for numbers this build does not know."""
        return self.to_word.get(number, "") if number else ""

    def json(self, number: int) -> str | int:
        """The word, or the number itself when this build does not know it (an open enum can carry one)."""
        return self.to_word.get(number, number)

    def number(self, value: Any) -> int | None:
        """The number for a word ("skill"), a value name in any case ("CAPABILITY_KIND_SKILL") or a known
        number; None for anything else. Booleans are not numbers here."""
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value if value in self.to_word else None
        if isinstance(value, str) and len(value) <= MAX_WORD_LENGTH:
            return self.from_text.get(value.strip().lower())
        return None

    def choices(self) -> str:
        return ", ".join(self.words)


_cache: dict[str, EnumWords] = {}


def enum_words(enum: EnumDescriptor) -> EnumWords:
    """The (cached) words of a generated enum's descriptor, e.g. `enum_words(pb.Sharing.DESCRIPTOR)`."""
    cached = _cache.get(enum.full_name)
    if cached is not None:
        return cached
    prefix = upper_snake(enum.name) + "_"
    to_word: dict[int, str] = {}
    from_text: dict[str, int] = {}
    words: list[str] = []
    for value in enum.values:
        name = value.name
        word = (name[len(prefix) :] if name.startswith(prefix) and len(name) > len(prefix) else name).lower()
        # With allow_alias the first name of a number is the canonical one, as in protoc's output.
        to_word.setdefault(value.number, word)
        from_text.setdefault(word, value.number)
        from_text.setdefault(name.lower(), value.number)
        if value.number and word not in words:
            words.append(word)
    result = EnumWords(enum.full_name, prefix, to_word, from_text, tuple(words))
    _cache[enum.full_name] = result
    return result
