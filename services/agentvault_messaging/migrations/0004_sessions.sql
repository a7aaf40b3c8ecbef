-- Sessions and their handoffs (sessions.py). Exactly one owner per session: the owner changes only by a handoff's
-- acceptance, one UPDATE fenced by the session's generation, and at most one handoff of a session is open.

CREATE TABLE sessions (
    id UUID PRIMARY KEY,
    -- One session per conversation: the send path finds a conversation's session by it.
    conversation_id VARCHAR(128) NOT NULL UNIQUE,
    owner_agent VARCHAR(64) NOT NULL,
    owner_instance VARCHAR(128) NOT NULL DEFAULT '',
    -- The owner's principal (its registered owner), for the messages moved to it.
    owner_principal VARCHAR(256) NOT NULL DEFAULT '',
    -- The fencing number: one more at each change of owner.
    generation BIGINT NOT NULL DEFAULT 1,
    state_version BIGINT NOT NULL DEFAULT 1,
    -- The state document byte for byte (JSON text), and its SHA-256.
    state BYTEA NOT NULL,
    state_sha256 BYTEA NOT NULL,
    metadata JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE session_handoffs (
    id UUID PRIMARY KEY,
    session_id UUID NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    from_agent VARCHAR(64) NOT NULL,
    from_instance VARCHAR(128) NOT NULL DEFAULT '',
    -- The agents' registered owners: the recipient_owner of the notices and of the messages moved.
    from_principal VARCHAR(256) NOT NULL DEFAULT '',
    target_agent VARCHAR(64) NOT NULL,
    target_instance VARCHAR(128) NOT NULL DEFAULT '',
    target_mesh VARCHAR(255) NOT NULL DEFAULT '',
    target_principal VARCHAR(256) NOT NULL DEFAULT '',
    status VARCHAR(16) NOT NULL CHECK (status IN (
        'held', 'offered', 'accepted', 'rejected', 'cancelled', 'expired', 'refused'
    )),
    status_reason TEXT NOT NULL DEFAULT '',
    base_generation BIGINT NOT NULL,
    state BYTEA NOT NULL,
    state_sha256 BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    approval_id UUID,
    note TEXT NOT NULL DEFAULT '',
    deadline_seconds INTEGER NOT NULL,
    -- Set when offered (a held handoff's clock starts at its approval).
    deadline TIMESTAMPTZ,
    accepted_instance VARCHAR(128) NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- States are checked by their SHA-256 and often unique: stored out of line, uncompressed (pglz would cost more CPU
-- than it saves).
ALTER TABLE sessions ALTER COLUMN state SET STORAGE EXTERNAL;
ALTER TABLE session_handoffs ALTER COLUMN state SET STORAGE EXTERNAL;

-- At most one open handoff per session: two racing offers cannot both stand.
CREATE UNIQUE INDEX idx_session_handoffs_open ON session_handoffs (session_id) WHERE status IN ('held', 'offered');
CREATE INDEX idx_session_handoffs_deadline ON session_handoffs (deadline) WHERE status = 'offered';
CREATE INDEX idx_session_handoffs_approval ON session_handoffs (approval_id) WHERE status = 'held';
CREATE INDEX idx_session_handoffs_target ON session_handoffs (target_agent, created_at DESC);
CREATE INDEX idx_session_handoffs_from ON session_handoffs (from_agent, created_at DESC);
CREATE INDEX idx_session_handoffs_session ON session_handoffs (session_id, created_at DESC);

-- The history of owners: one row per owner, closed (until) when the next one takes over.
CREATE TABLE session_owners (
    session_id UUID NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    generation BIGINT NOT NULL,
    agent_id VARCHAR(64) NOT NULL,
    instance VARCHAR(128) NOT NULL DEFAULT '',
    handoff_id UUID,
    since TIMESTAMPTZ NOT NULL DEFAULT now(),
    until TIMESTAMPTZ,
    PRIMARY KEY (session_id, generation)
);
-- The send path: is this recipient a former owner of the conversation's session?
CREATE INDEX idx_session_owners_agent ON session_owners (agent_id, session_id);
