-- Handoffs to and from agents of peer meshes (session_federation.py).

-- The owner's mesh when a session was handed to an agent of a peer mesh ('' for this mesh): its messages go there.
ALTER TABLE sessions ADD COLUMN owner_mesh VARCHAR(255) NOT NULL DEFAULT '';
-- An offer to a peer mesh's agent still to be told its end (committed or aborted) at the peer: false until told.
ALTER TABLE session_handoffs ADD COLUMN peer_told BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE session_handoffs ADD COLUMN peer_check_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX idx_session_handoffs_peer ON session_handoffs (peer_check_at) WHERE NOT peer_told;

-- Offers a peer mesh made to this mesh's agents. The session moves here only when the peer, which owns it until
-- then, concludes the offer "committed": an acceptance here is "prepared" until then.
CREATE TABLE incoming_handoffs (
    id UUID PRIMARY KEY,
    peer VARCHAR(255) NOT NULL,
    session_id UUID NOT NULL,
    conversation_id VARCHAR(128) NOT NULL,
    from_agent VARCHAR(64) NOT NULL,
    target_agent VARCHAR(64) NOT NULL,
    target_instance VARCHAR(128) NOT NULL DEFAULT '',
    target_principal VARCHAR(256) NOT NULL DEFAULT '',
    status VARCHAR(16) NOT NULL CHECK (status IN (
        'offered', 'prepared', 'accepted', 'rejected', 'refused', 'expired', 'aborted'
    )),
    status_reason TEXT NOT NULL DEFAULT '',
    generation BIGINT NOT NULL,
    state BYTEA NOT NULL,
    state_sha256 BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    -- The SHA-256 of the offer as received: the same id sent again must be the same offer.
    request_hash BYTEA NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    deadline TIMESTAMPTZ NOT NULL,
    accepted_instance VARCHAR(128) NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE incoming_handoffs ALTER COLUMN state SET STORAGE EXTERNAL;
CREATE INDEX idx_incoming_handoffs_deadline ON incoming_handoffs (deadline) WHERE status = 'offered';
CREATE INDEX idx_incoming_handoffs_target ON incoming_handoffs (target_agent, created_at DESC);
