"""The one enum word/number mapping: both prefix rules agree for every enum of the protos, and words round-trip."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from google.protobuf.descriptor import EnumDescriptor, FileDescriptor

import agentvault
from agentvault.common.enums import MAX_WORD_LENGTH, enum_words, upper_snake
from agentvault.registry.v1 import registry_service_pb2 as pb


def _our_enums() -> list[EnumDescriptor]:
    found: dict[str, EnumDescriptor] = {}
    root = Path(next(iter(agentvault.__path__)))  # a namespace package: its first path is libs/agentvault
    for path in sorted(root.rglob("*_pb2.py")):
        name = ".".join(("agentvault", *path.relative_to(root).with_suffix("").parts))
        file: FileDescriptor = importlib.import_module(name).DESCRIPTOR
        if not file.package.startswith("agentvault."):
            continue
        pending = list(file.enum_types_by_name.values())
        messages = list(file.message_types_by_name.values())
        while messages:
            message = messages.pop()
            pending.extend(message.enum_types)
            messages.extend(message.nested_types)
        for enum in pending:
            found[enum.full_name] = enum
    return list(found.values())


ENUMS = _our_enums()


def test_the_protos_have_enums() -> None:
    assert len(ENUMS) >= 6, [e.full_name for e in ENUMS]


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.full_name)
def test_type_name_prefix_is_the_zero_values_prefix(enum: EnumDescriptor) -> None:
    # The two rules the old copies used (type name vs the zero value's name) must give the same words.
    zero = enum.values_by_number[0]
    assert zero.name == upper_snake(enum.name) + "_UNSPECIFIED"
    assert all(v.name.startswith(enum_words(enum).prefix) for v in enum.values)


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.full_name)
def test_words_round_trip(enum: EnumDescriptor) -> None:
    words = enum_words(enum)
    assert "unspecified" not in words.words
    for value in enum.values:
        if not value.number:
            continue
        word = words.word(value.number)
        assert word and word == word.lower() and not word.startswith(words.prefix.lower())
        assert words.number(word) == value.number
        assert words.number(value.name) == value.number
        assert words.number(word.upper()) == value.number
        assert words.number(value.number) == value.number


def test_examples_and_refusals() -> None:
    kind = enum_words(pb.CapabilityKind.DESCRIPTOR)
    assert kind.words == ("tool", "skill", "model")
    assert kind.word(pb.CAPABILITY_KIND_SKILL) == "skill"
    assert kind.word(0) == "" and kind.word(999) == ""
    assert kind.json(999) == 999 and kind.json(pb.CAPABILITY_KIND_TOOL) == "tool"
    assert kind.number(" Capability_Kind_Model ") == pb.CAPABILITY_KIND_MODEL
    for bad in ("nope", True, 999, None, 1.0, "x" * (MAX_WORD_LENGTH + 1)):
        assert kind.number(bad) is None
    assert enum_words(pb.Protocol.DESCRIPTOR).word(pb.PROTOCOL_A2A) == "a2a"
    assert upper_snake("HTTPMethod") == "HTTP_METHOD"
