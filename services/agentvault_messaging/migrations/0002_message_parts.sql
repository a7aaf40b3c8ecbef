-- Messages sent open (streaming): their parts, appended by the sender after the send, and the stream's state.
-- A message's parts go with it: retention deletes the message, and the cascade its stream.

CREATE TABLE message_streams (
    message_id UUID PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    state VARCHAR(16) NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed', 'aborted')),
    reason TEXT NOT NULL DEFAULT '',
    -- How many parts are stored: the last index (parts are numbered from 1).
    parts INTEGER NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    -- The last append: an open stream idle past MESSAGING_STREAM_IDLE_SECONDS is aborted by the sweeper.
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX idx_message_streams_open ON message_streams (updated_at) WHERE state = 'open';

CREATE TABLE message_parts (
    message_id UUID NOT NULL REFERENCES message_streams (message_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    -- agentvault.messaging.v1.Part, deterministically serialized (a retried append is compared byte for byte).
    body BYTEA NOT NULL,
    PRIMARY KEY (message_id, idx)
);
