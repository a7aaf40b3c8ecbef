"""The one scope check every service makes, and the principal a GetCaller answer describes."""

from __future__ import annotations

import pytest

from agentvault.common.auth import Role, acting_principal
from agentvault.common.errors import PermissionDenied
from agentvault.common.principal import Kind, Principal, person
from agentvault.common.remote_auth import _principal_of, check_scope
from agentvault.registry.v1 import registry_service_pb2 as pb


def test_an_api_key_keeps_its_old_answer_and_a_token_is_told_the_scope() -> None:
    member = person("prn_m", "m", Role.MEMBER)
    check_scope(member, "agents:write")
    with pytest.raises(PermissionDenied) as denied:
        check_scope(member, "federation:admin")
    assert denied.value.reason == "ADMIN_REQUIRED" and denied.value.metadata["scope"] == "federation:admin"
    check_scope(person("prn_a", "a", Role.ADMIN), "federation:admin")  # admin implies every scope
    token = Principal(Kind.SERVICE, "avc_1", scopes=frozenset({"agents:read"}), client_id="avc_1")
    for scope in ("agents:write", "admin"):
        with pytest.raises(PermissionDenied) as denied:
            check_scope(token, scope)
        assert denied.value.reason == "SCOPE_REQUIRED" and denied.value.metadata["scope"] == scope


def test_a_token_acts_for_the_principal_that_registered_its_client() -> None:
    bound = Principal(Kind.AGENT, "avc_2", owner="prn_owner", agent_id="a1", client_id="avc_2")
    acting = acting_principal(bound)
    assert (acting.id, acting.subject, acting.client_id) == ("prn_owner", "avc_2", "avc_2")
    assert acting.owns("prn_owner") and not acting.owns("avc_2")
    ownerless = Principal(Kind.SERVICE, "avc_3")
    assert acting_principal(ownerless).id == "avc_3"


def test_getcaller_answers_old_and_new_become_one_principal() -> None:
    old_admin = _principal_of(pb.Caller(name="admin", role=pb.ROLE_ADMIN, principal_id="prn_x"))
    assert old_admin.kind is Kind.PERSON and old_admin.is_admin
    peer = _principal_of(pb.Caller(name="b", role=pb.ROLE_MEMBER, is_peer=True, principal_id="peer:b"))
    assert peer.is_peer and not peer.is_admin and peer.has_scope("agents:read")
    agent = _principal_of(
        pb.Caller(name="avc_4", principal_id="prn_o", kind="agent", scopes=["agents:read"], client_id="avc_4")
    )
    assert agent.kind is Kind.AGENT and agent.has_scope("agents:read") and not agent.has_scope("agents:write")
