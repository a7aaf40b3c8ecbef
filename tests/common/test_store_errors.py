"""Store errors map to the statuses clients act on: an outage is UNAVAILABLE (retry), never INTERNAL."""

from __future__ import annotations

import grpc
from asyncpg import exceptions as pg_errors
from redis import exceptions as redis_errors

from agentvault.common.errors import STORE_UNAVAILABLE, from_store_error


def test_a_postgres_client_left_mid_statement_by_a_crash_is_an_outage() -> None:
    # Seen when PostgreSQL was SIGKILLed under load (tests/messaging/test_durability.py).
    mapped = from_store_error(
        pg_errors.InternalClientError("cannot switch to state 15; another operation is in progress")
    )
    assert mapped is not None and mapped.code == grpc.StatusCode.UNAVAILABLE and mapped.reason == STORE_UNAVAILABLE


def test_connection_failures_of_either_store_are_outages_and_bugs_are_not() -> None:
    for exc in (ConnectionRefusedError(111, "refused"), redis_errors.ConnectionError("gone")):
        mapped = from_store_error(exc)
        assert mapped is not None and mapped.code == grpc.StatusCode.UNAVAILABLE
    assert from_store_error(ValueError("a bug")) is None
