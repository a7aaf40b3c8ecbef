-- The mesh's Cedar policies (agentvault.policy.v1), written by admins and followed by the enforcing services.
CREATE TABLE policies (
    id UUID PRIMARY KEY,
    name VARCHAR(200) NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    created_by VARCHAR(128) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The policy set's version: one row, bumped in the same transaction as every change, so a watcher that reads the
-- set and its version in one snapshot never pairs a set with another version.
CREATE TABLE policy_set_version (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    version BIGINT NOT NULL
);
INSERT INTO policy_set_version (version) VALUES (0);

-- Decisions of the enforcing services (every deny and ask, allows too), kept POLICY_DECISION_LOG_RETENTION_DAYS.
CREATE TABLE policy_decisions (
    id BIGSERIAL PRIMARY KEY,
    decided_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    caller VARCHAR(500) NOT NULL,
    action VARCHAR(64) NOT NULL,
    target VARCHAR(500) NOT NULL,
    outcome VARCHAR(8) NOT NULL CHECK (outcome IN ('allow', 'deny', 'ask')),
    policy_ids TEXT[] NOT NULL DEFAULT '{}',
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX policy_decisions_decided_at ON policy_decisions (decided_at);

-- Named chores (pruning the decision log) run by one replica at a time (agentvault.common.lease).
CREATE TABLE policy_leases (
    chore_kind VARCHAR(16) NOT NULL,
    chore_id VARCHAR(64) NOT NULL,
    next_check_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by VARCHAR(128) NOT NULL DEFAULT '',
    claimed_at TIMESTAMPTZ,
    PRIMARY KEY (chore_kind, chore_id)
);
