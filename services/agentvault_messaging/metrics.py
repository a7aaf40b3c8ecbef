"""The messaging service's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SENT = Counter(
    "messages_sent_total", "Sends answered, by transport and status (accepted, held, denied).", ["transport", "status"]
)
SEND_SECONDS = Histogram(
    "message_send_seconds",
    "Time to accept one send: validation, routing, the policy decision and the durable write.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
DELIVERED = Counter("messages_delivered_total", "First deliveries, by transport.", ["transport"])
DELIVERY_SECONDS = Histogram(
    "message_delivery_seconds",
    "From accepted to first delivered, by transport.",
    ["transport"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 300),
)
ATTEMPTS = Counter(
    "message_delivery_attempts_total", "Push delivery attempts, by transport and result.", ["transport", "result"]
)
DEAD_LETTERED = Counter("messages_dead_lettered_total", "Messages dead-lettered, by transport.", ["transport"])
DUPLICATES = Counter(
    "message_duplicates_total",
    "Duplicates detected by message id: repeated sends, repeated acks, and redeliveries (at least once).",
    ["kind"],
)
EXPIRED = Counter("messages_expired_total", "Messages that expired before they were handled.")
QUEUE_DEPTH = Gauge(
    "message_queue_depth", "Messages not yet finished, by transport and status.", ["transport", "status"]
)
CIRCUITS_OPEN = Gauge("message_circuits_open", "Endpoints whose circuit breaker is open (this replica).")
TOOL_CALLS = Counter(
    "tool_calls_total",
    "Tool invocations that reached the tool's MCP server, by outcome: completed, tool_error, failed, cancelled.",
    ["outcome"],
)
STREAM_PARTS = Counter(
    "message_stream_parts_appended_total",
    "Parts appended to messages sent streaming after their send (a retry of parts already stored is not counted).",
)
STREAMS_ENDED = Counter(
    "message_streams_ended_total",
    "Streams ended, by how: closed (by the sender), aborted (by the sender), idle (aborted by the sweeper).",
    ["how"],
)
STREAMS_OPEN = Gauge("message_streams_open", "Streams open, all replicas (counted by each sweep).")
for _how in ("closed", "aborted", "idle"):  # each series from the start, at 0
    STREAMS_ENDED.labels(_how)
