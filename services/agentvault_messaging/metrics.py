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
