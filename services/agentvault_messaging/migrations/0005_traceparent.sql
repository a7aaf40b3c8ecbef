-- The W3C traceparent of the send that stored a message (empty when no trace was active), so that its delivery,
-- maybe by another replica and later, is recorded in the sender's trace.
ALTER TABLE messages ADD COLUMN traceparent VARCHAR(64) NOT NULL DEFAULT '';
