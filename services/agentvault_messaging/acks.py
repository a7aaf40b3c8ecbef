"""AckMessages: many deliveries acknowledged in one statement, each receipt answered on its own."""

from __future__ import annotations

import uuid

from agentvault.common.errors import FieldViolation, InvalidArgument
from agentvault.messaging.v1 import messaging_service_pb2 as mpb
from agentvault_messaging import metrics
from agentvault_messaging.events import Hub
from agentvault_messaging.store import Holder, Store

# As many as a stream may have in flight (StreamInbox's max_in_flight).
MAX_ACKS = 1000
_REASONS = {"acked": "", "already": "ALREADY_ACKNOWLEDGED", "stale": "RECEIPT_STALE", "missing": "MESSAGE_NOT_FOUND"}


def _receipts(request: mpb.AckMessagesRequest) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """The request's (message id, receipt) pairs, a message named twice kept once (its first receipt)."""
    if not 1 <= len(request.receipts) <= MAX_ACKS:
        raise InvalidArgument([FieldViolation("receipts", f"must have 1 to {MAX_ACKS} items")])
    violations: list[FieldViolation] = []
    out: dict[uuid.UUID, uuid.UUID] = {}
    for i, item in enumerate(request.receipts):
        pair = []
        for name in ("message_id", "receipt"):
            try:
                pair.append(uuid.UUID(getattr(item, name)))
            except ValueError:
                violations.append(FieldViolation(f"receipts[{i}].{name}", "must be a UUID"))
        if len(pair) == 2:
            out.setdefault(pair[0], pair[1])
        if len(violations) >= 20:
            break
    if violations:
        raise InvalidArgument(violations)
    return list(out.items())


async def ack_many(
    store: Store, hub: Hub, holder: Holder | None, request: mpb.AckMessagesRequest
) -> mpb.AckMessagesResponse:
    results = await store.ack_many(_receipts(request), holder)
    acked = [row for _, _, row in results if row is not None]
    if acked:
        await hub.publish(acked)
    already = sum(1 for _, result, _ in results if result == "already")
    if already:
        metrics.DUPLICATES.labels("ack").inc(already)
    return mpb.AckMessagesResponse(
        results=[
            mpb.AckResult(message_id=str(key), acknowledged=result in ("acked", "already"), reason=_REASONS[result])
            for key, result, _ in results
        ]
    )
