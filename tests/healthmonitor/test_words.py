"""The health monitor's status words are the shared enum words (agentvault.common.enums), with no mapping of its own."""

from __future__ import annotations

import pytest

from agentvault.federation.v1 import federation_service_pb2 as fed_pb
from agentvault.healthmonitor.v1 import health_monitor_service_pb2 as pb
from agentvault.registry.v1 import registry_service_pb2 as reg_pb
from agentvault_healthmonitor import checks, domain
from agentvault_healthmonitor.registry import peer_status
from agentvault_healthmonitor.servicer import OVERALL


@pytest.mark.parametrize("word", domain.STATUSES)
def test_every_check_status_is_a_peer_status(word: str) -> None:
    number = peer_status(word)
    assert number != fed_pb.PEER_STATUS_UNSPECIFIED
    assert fed_pb.PeerStatus.Name(number) == f"PEER_STATUS_{word.upper()}"


def test_a_subject_never_checked_is_unspecified() -> None:
    assert peer_status("") == fed_pb.PEER_STATUS_UNSPECIFIED


@pytest.mark.parametrize("word", ["healthy", "degraded", "down"])
def test_every_overall_word_is_an_overall_status(word: str) -> None:
    assert pb.OverallStatus.Name(OVERALL.number(word) or 0) == f"OVERALL_STATUS_{word.upper()}"


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b'{"status": "healthy", "agent_count": 4}', domain.HEALTHY),
        # Proto JSON of a mesh's edge, the value name, and the number: the same value, as the shared mapping reads it.
        (b'{"status": "HEALTH_STATUS_HEALTHY"}', domain.HEALTHY),
        (b'{"status": " Healthy "}', domain.HEALTHY),
        (b'{"status": "unhealthy"}', domain.UNHEALTHY),
        (b'{"status": "degraded"}', domain.UNHEALTHY),
        # Another enum's prefix is not this one's: PEER_STATUS_HEALTHY is not a HealthStatus.
        (b'{"status": "peer_status_healthy"}', domain.UNHEALTHY),
    ],
)
def test_rest_health_answers_are_read_with_the_shared_words(answer: bytes, status: str) -> None:
    assert checks._rest_answer(answer)[0] == status
    assert checks.HEALTH_STATUS.name == reg_pb.HealthStatus.DESCRIPTOR.full_name
