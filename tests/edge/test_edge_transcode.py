"""JSON <-> protobuf conventions: enum words, int64 as numbers, defaults printed, query conversion."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from agentvault.common.settings import Env
from agentvault.federation.v1 import federation_service_pb2 as fpb
from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_edge.http_request import HttpRequestParts, build_request
from agentvault_edge.json_in import json_to_message, parse_field_mask
from agentvault_edge.json_out import any_to_json, message_to_json, response_to_json
from agentvault_edge.settings import EdgeSettings
from agentvault_edge.transcode import FieldError

from .testproto import message_class

Probe = message_class("Probe")


def _probe(query: list[tuple[str, str]] | None = None, body: Any = None, body_field: str = "", **bindings: str) -> Any:
    parts = HttpRequestParts("GET", bindings, query or [], body)
    return build_request(Probe, body_field, parts)


def test_enums_print_as_the_shared_words_without_the_type_prefix() -> None:
    # The words come from agentvault.common.enums (tests/common/test_enums.py); this checks the edge uses them.
    agent = pb.Agent(sharing=pb.SHARING_FEDERATED, health_status=pb.HEALTH_STATUS_HEALTHY)
    agent.capabilities.add(kind=pb.CAPABILITY_KIND_SKILL)
    agent.endpoints.add(protocol=pb.PROTOCOL_A2A)
    out = message_to_json(agent)
    assert (out["sharing"], out["health_status"]) == ("federated", "healthy")
    assert out["capabilities"][0]["kind"] == "skill" and out["endpoints"][0]["protocol"] == "a2a"
    assert message_to_json(pb.Agent())["sharing"] == "unspecified"


@pytest.mark.parametrize("text", ["unspecified", "SHARING_UNSPECIFIED"])
def test_enum_input_still_accepts_the_zero_value(text: str) -> None:
    msg = pb.ListAgentsRequest(sharing=pb.SHARING_LOCAL)
    json_to_message({"sharing": text}, msg)
    assert msg.sharing == 0


@pytest.mark.parametrize("text", ["federated", "FEDERATED", "Federated", "SHARING_FEDERATED", "sharing_federated"])
def test_enum_input_accepts_word_or_full_name_in_any_case(text: str) -> None:
    msg = pb.ListAgentsRequest()
    json_to_message({"sharing": text}, msg)
    assert msg.sharing == pb.SHARING_FEDERATED


@pytest.mark.parametrize("value", ["public", "SHARING_", "", 3, True, "federatedx", ["local"], " local"])
def test_bad_enum_names_the_field_and_the_allowed_words(value: Any) -> None:
    with pytest.raises(FieldError) as caught:
        json_to_message({"agent": {"sharing": value}}, pb.CreateAgentRequest())
    assert caught.value.field == "agent.sharing"
    assert "must be one of private, local, federated;" in caught.value.description


def test_every_field_is_printed_with_snake_case_names_and_defaults() -> None:
    out = message_to_json(pb.Agent(name="a"))
    assert out["name"] == "a"
    assert out["agent_type"] == ""
    assert out["capabilities"] == []
    assert out["tags"] == []
    assert out["sharing"] == "unspecified"
    assert out["health_status"] == "unspecified"
    assert out["create_time"] is None  # an unset message is null, not missing
    assert "agentType" not in out


def test_int64_prints_as_a_json_number_and_timestamps_as_rfc3339() -> None:
    health = response_to_json(pb.GetHealthResponse(status=pb.HEALTH_STATUS_DEGRADED, agent_count=2**62))
    assert health == {"status": "degraded", "agent_count": 2**62}
    key = pb.ApiKey(id="k")
    key.create_time.FromSeconds(0)
    assert message_to_json(key)["create_time"] == "1970-01-01T00:00:00Z"


def test_nested_repeated_and_map_values_are_converted() -> None:
    probe = Probe(colors=[1, 2], counts={"a": 2**40, "b": -1}, single=0.1, blob=b"\x00\xff")
    probe.inners.add(color=2, level=-3)
    out = message_to_json(probe)
    assert out["colors"] == ["red", "deep_blue"]
    assert out["counts"] == {"a": 2**40, "b": -1}
    assert out["inners"] == [{"note": "", "level": -3, "color": "deep_blue"}]
    assert out["single"] == 0.1  # the float32, printed shortest rather than as 0.10000000149011612
    assert out["blob"] == "AP8="
    assert out["mask"] is None and out["extra"] is None


def test_json_input_accepts_every_kind() -> None:
    msg = Probe()
    json_to_message(
        {
            "name": "n",
            "small": -5,
            "big": "9007199254740993",
            "ubig": 18446744073709551615,
            "flag": True,
            "ratio": 1.5,
            "color": "deep_blue",
            "tags": ["x", "y"],
            "colors": ["RED", "COLOR_DEEP_BLUE"],
            "inner": {"note": "hi", "level": 3},
            "counts": {"k": 7},
            "blob": "AP8",
            "at": "2024-01-31T12:00:00Z",
            "mask": "name,inner.note,agentType",
            "inners": [{"color": "red"}],
            "extra": {"free": ["form", 1]},
        },
        msg,
    )
    assert msg.big == 9007199254740993 and msg.ubig == 2**64 - 1
    assert list(msg.colors) == [1, 2] and msg.inner.note == "hi" and msg.counts["k"] == 7
    assert msg.blob == b"\x00\xff"
    assert msg.at.seconds == 1706702400
    assert list(msg.mask.paths) == ["name", "inner.note", "agent_type"]
    assert msg.extra["free"][0] == "form"


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"small": 2**31}, "small", "from -2147483648 to 2147483647"),
        ({"small": 1.5}, "small", "integer"),
        ({"small": True}, "small", "integer"),
        ({"ubig": -1}, "ubig", "from 0"),
        ({"big": "12abc"}, "big", "integer"),
        ({"flag": "true"}, "flag", "true or false"),
        ({"name": 5}, "name", "must be a string"),
        ({"tags": "x"}, "tags", "JSON array"),
        ({"tags": ["x", None]}, "tags[1]", "null"),
        ({"inner": []}, "inner", "JSON object"),
        ({"inner": {"nope": 1}}, "inner.nope", "unknown field"),
        ({"inners": [{"level": "x"}]}, "inners[0].level", "integer"),
        ({"counts": {"k": "v"}}, "counts[k]", "integer"),
        ({"at": "yesterday"}, "at", "RFC 3339"),
        ({"mask": "a b"}, "mask", "invalid field path"),
        ({"blob": "***"}, "blob", "base64"),
        ({"single": 1e39}, "single", "32-bit"),
        ({"ratio": "lots"}, "ratio", "number"),
        ({"name": "a", "name_": 1}, "name_", "unknown field"),
        ({"name": "\ud800"}, "name", "invalid value"),
    ],
)
def test_wrong_json_values_name_the_field(data: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(FieldError) as caught:
        json_to_message(data, Probe())
    assert caught.value.field == field
    assert fragment in caught.value.description


def test_camel_case_names_are_accepted_but_not_twice() -> None:
    msg = pb.Agent()
    json_to_message({"agentType": "nlp"}, msg)
    assert msg.agent_type == "nlp"
    with pytest.raises(FieldError, match="given twice"):
        json_to_message({"agentType": "nlp", "agent_type": "x"}, pb.Agent())


def test_query_parameters_convert_per_field_type() -> None:
    msg = _probe(
        [
            ("small", "10"),
            ("big", "-9007199254740993"),
            ("flag", "true"),
            ("color", "RED"),
            ("tags", "a"),
            ("tags", "b"),
            ("colors", "red"),
            ("colors", "deep_blue"),
            ("inner.note", "n"),
            ("inner.color", "deep_blue"),
            ("at", "2024-01-31T12:00:00Z"),
            ("mask", "name,inner.note"),
            ("ratio", "0.25"),
            ("name", "a b"),
        ]
    )
    assert msg.small == 10 and msg.big == -9007199254740993 and msg.flag is True
    assert msg.color == 1 and list(msg.tags) == ["a", "b"] and list(msg.colors) == [1, 2]
    assert msg.inner.note == "n" and msg.inner.color == 2
    assert msg.at.seconds == 1706702400 and list(msg.mask.paths) == ["name", "inner.note"]
    assert msg.ratio == 0.25 and msg.name == "a b"


@pytest.mark.parametrize(
    ("query", "field", "fragment"),
    [
        ([("nope", "1")], "nope", "unknown field"),
        ([("small", "ten")], "small", "integer"),
        ([("small", "99999999999")], "small", "2147483647"),
        ([("flag", "yes")], "flag", "true or false"),
        ([("color", "purple")], "color", "must be one of red, deep_blue; got"),
        ([("name", "a"), ("name", "b")], "name", "more than once"),
        ([("inner", "x")], "inner", "is a message"),
        ([("counts", "x")], "counts", "cannot be set"),
        ([("inners.note", "x")], "inners.note", "no sub-fields"),
        ([("name.x", "x")], "name.x", "no sub-fields"),
    ],
)
def test_bad_query_parameters_name_the_field(query: list[tuple[str, str]], field: str, fragment: str) -> None:
    with pytest.raises(FieldError) as caught:
        _probe(query)
    assert caught.value.field == field
    assert fragment in caught.value.description


def test_path_variables_win_and_cannot_be_repeated_in_the_query() -> None:
    msg = _probe(body={"name": "from-body", "small": 1}, body_field="*", name="from-path")
    assert msg.name == "from-path" and msg.small == 1
    with pytest.raises(FieldError, match="URL path"):
        _probe([("name", "x")], name="from-path")
    with pytest.raises(FieldError, match="JSON body"):
        _probe([("small", "1")], body={}, body_field="*")
    with pytest.raises(FieldError, match="JSON body"):
        _probe([("inner.note", "1")], body={}, body_field="inner")


def test_patch_infers_the_mask_from_top_level_body_keys_only_for_patch() -> None:
    body = {"name": "new", "tags": ["x"], "id": "ignored-by-mask"}

    def build(method: str, query: list[tuple[str, str]]) -> Any:
        parts = HttpRequestParts(method, {"agent.id": "a1"}, query, body)
        return build_request(pb.UpdateAgentRequest, "agent", parts)

    patched = build("PATCH", [])
    assert list(patched.update_mask.paths) == ["name", "tags"]
    assert patched.agent.id == "a1"
    assert list(build("PUT", []).update_mask.paths) == []
    assert list(build("PATCH", [("update_mask", "description")]).update_mask.paths) == ["description"]
    for empty in ({}, None, {"id": "a1"}):
        # No field to change must not turn into an empty mask, which would replace the whole agent.
        with pytest.raises(FieldError, match="at least one field"):
            build_request(pb.UpdateAgentRequest, "agent", HttpRequestParts("PATCH", {"agent.id": "a1"}, [], empty))


def test_field_mask_accepts_snake_and_camel_paths() -> None:
    assert parse_field_mask(" a_b , cD.eF ,", "m") == ["a_b", "c_d.e_f"]


def test_any_details_print_with_their_type() -> None:
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason="AGENT_NOT_FOUND", domain="agentvault.io", metadata={"k": "v"}))
    assert any_to_json(packed) == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "AGENT_NOT_FOUND",
        "domain": "agentvault.io",
        "metadata": {"k": "v"},
    }
    unknown = any_pb2.Any(type_url="type.googleapis.com/no.such.Type", value=b"\x01")
    assert any_to_json(unknown) == {"@type": "type.googleapis.com/no.such.Type", "value": "AQ=="}


def test_settings_defaults_and_backend_addresses() -> None:
    settings = EdgeSettings.load(["registry"], Env({"REGISTRY_PORT": "6000", "DISCOVERY_ADDR": "disc:1"}))
    assert settings.port == 8080
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.call_timeout == 30.0
    assert settings.backends["registry"] == "127.0.0.1:6000"
    assert settings.backends["federation"] == "127.0.0.1:6000"
    assert settings.backends["discovery"] == "disc:1"
    assert settings.backends["healthmonitor"] == "127.0.0.1:50053"
    from agentvault.common.settings import SettingsError

    with pytest.raises(SettingsError, match="PAYMENTS_ADDR"):
        EdgeSettings.load(["payments"], Env({}))
    assert EdgeSettings.load(["payments"], Env({"PAYMENTS_ADDR": "pay:9"})).backends["payments"] == "pay:9"


def _node_class() -> Any:
    """A message that contains itself, with a proto3 optional, a wrapper and a bool-keyed map, in its own pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    f_ = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="edgetest/node.proto",
        package="edgetest.node",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    node = file.message_type.add(name="Node")
    entry = node.nested_type.add(name="FlagsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f_.TYPE_BOOL, label=f_.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=f_.TYPE_BYTES, label=f_.LABEL_OPTIONAL)
    node.field.add(name="name", number=1, type=f_.TYPE_STRING, label=f_.LABEL_OPTIONAL)
    node.field.add(
        name="children", number=2, type=f_.TYPE_MESSAGE, label=f_.LABEL_REPEATED, type_name=".edgetest.node.Node"
    )
    node.field.add(
        name="parent", number=3, type=f_.TYPE_MESSAGE, label=f_.LABEL_OPTIONAL, type_name=".edgetest.node.Node"
    )
    node.field.add(
        name="depth", number=4, type=f_.TYPE_INT32, label=f_.LABEL_OPTIONAL, proto3_optional=True, oneof_index=0
    )
    node.oneof_decl.add(name="_depth")
    node.field.add(
        name="weight", number=5, type=f_.TYPE_MESSAGE, label=f_.LABEL_OPTIONAL, type_name=".google.protobuf.FloatValue"
    )
    node.field.add(
        name="flags",
        number=6,
        type=f_.TYPE_MESSAGE,
        label=f_.LABEL_REPEATED,
        type_name=".edgetest.node.Node.FlagsEntry",
    )
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("edgetest.node.Node"))


def test_a_message_that_contains_itself_optionals_wrappers_and_bool_keys() -> None:
    # The encoders are built once per message type; a type met again while its own is being built must still work.
    node_class = _node_class()
    root = node_class(name="root", depth=0)
    child = root.children.add(name="child")
    child.parent.name = "root"
    child.weight.value = 0.1
    child.flags[True] = b"\x01"
    child.flags[False] = b""
    assert message_to_json(root) == {
        "name": "root",
        "children": [
            {
                "name": "child",
                "children": [],
                "parent": {"name": "root", "children": [], "parent": None, "depth": None, "weight": None, "flags": {}},
                "depth": None,  # a proto3 optional that is not set is null, one set to 0 is 0
                "weight": 0.1,
                "flags": {"false": "", "true": "AQ=="},
            }
        ],
        "parent": None,
        "depth": 0,
        "weight": None,
        "flags": {},
    }
    assert response_to_json(root, "children") == [message_to_json(child)]
    assert response_to_json(root, "depth") == 0 and response_to_json(child, "depth") is None


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [
        (1706702400, 5_000_000, "2024-01-31T12:00:00.005Z"),
        (-1, 1, "1969-12-31T23:59:59.000000001Z"),
        (-62_135_596_801, 0, None),  # before year 1: no RFC 3339 text, null rather than a 500
        (0, 1_000_000_000, None),
    ],
)
def test_timestamps_print_as_rfc3339_or_null_when_out_of_range(seconds: int, nanos: int, expected: str | None) -> None:
    key = pb.ApiKey()
    key.create_time.seconds, key.create_time.nanos = seconds, nanos
    assert message_to_json(key)["create_time"] == expected


def test_input_only_fields_are_never_printed() -> None:
    # A peer's api_key is INPUT_ONLY: the OpenAPI document forbids it in answers, so even empty it must not appear.
    for peer in (fpb.Peer(name="p", api_key="avf_secret"), fpb.Peer(name="p")):
        printed = message_to_json(peer)
        assert "api_key" not in printed and printed["name"] == "p"
    listed = message_to_json(fpb.ListPeersResponse(peers=[fpb.Peer(name="p", api_key="k")]))
    assert "api_key" not in listed["peers"][0]
