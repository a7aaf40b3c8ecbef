-- The messaging service's own tables. Agents and principals are named by the registry's ids; nothing here
-- references the registry's tables, which another service owns.

-- One row per message, the one source of truth for its content and its status. Delivery reads it with
-- FOR UPDATE SKIP LOCKED, so any number of replicas share the work, and an acknowledged send survives the loss
-- of every process (Redis carries only wake-ups, which the workers also make up for by polling).
CREATE TABLE messages (
    id UUID PRIMARY KEY,
    -- The order of sends: inboxes deliver in this order.
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    -- The verified sender: its policy uid (Caller::Agent::"..."), kind, principal id and agent id if an agent.
    sender VARCHAR(600) NOT NULL,
    sender_kind VARCHAR(16) NOT NULL,
    sender_id VARCHAR(256) NOT NULL,
    sender_agent VARCHAR(64) NOT NULL DEFAULT '',
    -- The sender's own inbox, where replies to this message go.
    sender_inbox VARCHAR(300) NOT NULL,
    -- Whose inbox it lands in: agent:<uuid>, person:<id>, client:<id> or peer:<id>.
    inbox VARCHAR(300) NOT NULL,
    recipient_agent VARCHAR(64) NOT NULL DEFAULT '',
    recipient_owner VARCHAR(256) NOT NULL DEFAULT '',
    recipient_mesh VARCHAR(255) NOT NULL DEFAULT '',
    -- inbox (pulled or streamed), or the transport that pushes it (http, websocket, a2a, federation...).
    transport VARCHAR(32) NOT NULL,
    endpoint TEXT NOT NULL DEFAULT '',
    conversation_id VARCHAR(128) NOT NULL,
    correlation_id VARCHAR(128) NOT NULL,
    in_reply_to UUID,
    idempotency_key VARCHAR(128),
    -- SHA-256 of what was sent, so a reused idempotency key with other content is refused.
    request_hash BYTEA NOT NULL,
    -- The message itself (agentvault.messaging.v1.Message, content fields only), serialized.
    body BYTEA NOT NULL,
    size INTEGER NOT NULL,
    status VARCHAR(16) NOT NULL CHECK (status IN (
        'held', 'accepted', 'delivered', 'acknowledged', 'failed', 'dead_lettered', 'expired', 'refused'
    )),
    status_reason TEXT NOT NULL DEFAULT '',
    approval_id UUID,
    attempts INTEGER NOT NULL DEFAULT 0,
    -- Not delivered (or not again) before this: the visibility timeout of a received message, a retry's backoff.
    visible_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Names the current delivery; an ack or nack must carry it.
    receipt UUID,
    expire_at TIMESTAMPTZ,
    -- Transport ids worth keeping (e.g. an A2A task id).
    annotations JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The same idempotency key from the same sender is the same message.
CREATE UNIQUE INDEX idx_messages_idempotency ON messages (sender, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- An inbox's deliverable messages, in send order.
CREATE INDEX idx_messages_inbox ON messages (inbox, seq) WHERE status IN ('accepted', 'delivered');
-- What the delivery workers push next.
CREATE INDEX idx_messages_due ON messages (visible_at) WHERE status IN ('accepted', 'delivered') AND transport <> 'inbox';
CREATE INDEX idx_messages_conversation ON messages (conversation_id, seq);
CREATE INDEX idx_messages_correlation ON messages (correlation_id);
CREATE INDEX idx_messages_reply ON messages (in_reply_to) WHERE in_reply_to IS NOT NULL;
CREATE INDEX idx_messages_held ON messages (approval_id) WHERE status = 'held';
CREATE INDEX idx_messages_expiring ON messages (expire_at) WHERE expire_at IS NOT NULL AND status IN ('held', 'accepted', 'delivered');
-- Listing by participant, newest first; retention and the dead-letter queue by status and age.
CREATE INDEX idx_messages_sender ON messages (sender, created_at DESC);
CREATE INDEX idx_messages_inbox_all ON messages (inbox, created_at DESC);
CREATE INDEX idx_messages_status_age ON messages (status, updated_at);
