"""configure_tracing in a real process: the standard OTEL_* variables choose the export, spans still batched when
the process ends are exported, and with no variable set nothing is recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ..conftest import eventually
from . import otlp_receiver
from .otlp_receiver import Receiver

# One span in a process that then exits at once: the batch delay (a minute) never elapses before the exit.
SCRIPT = """
from agentvault.common import tracing
tracing.configure_tracing("probe")
with tracing.span("probe-span"):
    pass
print("recording" if tracing.recording() else "not recording")
"""


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from otlp_receiver.running()


def run(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_spans_batched_at_exit_are_exported(receiver: Receiver, protocol: str) -> None:
    port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    label = protocol.replace("/", "-")
    done = run(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_RESOURCE_ATTRIBUTES=f"mesh={label}",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "recording"

    async def exported() -> None:
        with receiver.lock:
            got = [(s.service, s.name) for s in receiver.spans if s.mesh == label]
        assert got == [("probe", "probe-span")]

    await eventually(exported, 10)


def test_nothing_is_recorded_without_an_exporter() -> None:
    assert run().stdout.strip() == "not recording"
    assert run(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_SDK_DISABLED="true").stdout.strip() == (
        "not recording"
    )


def test_an_unknown_protocol_is_said_plainly_and_exports_nothing() -> None:
    done = run(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_PROTOCOL="carrier-pigeon")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "not recording"
    assert "'carrier-pigeon' is not supported" in done.stderr and "Traceback" not in done.stderr
