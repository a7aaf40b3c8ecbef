-- Connections and their trust, approvals of "ask" decisions, and the grants they (and allowed requests) make.

-- A caller as seen by this mesh (agent_id '') or by one of its agents, created on first authenticated contact.
CREATE TABLE connections (
    id UUID PRIMARY KEY,
    caller_kind VARCHAR(16) NOT NULL CHECK (caller_kind IN ('person', 'agent', 'peer', 'client')),
    caller_id VARCHAR(500) NOT NULL,
    agent_id VARCHAR(64) NOT NULL DEFAULT '',
    trust_level VARCHAR(16) NOT NULL CHECK (trust_level IN ('blocked', 'untrusted', 'basic', 'trusted')),
    interactions BIGINT NOT NULL DEFAULT 0,
    -- Violations counted in the window that began at violation_window_start; reset when trust changes.
    violations INTEGER NOT NULL DEFAULT 0,
    violation_window_start TIMESTAMPTZ,
    -- Interactions since the last violation or trust change: what a promotion rule counts.
    clean_interactions BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    trust_changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (caller_kind, caller_id, agent_id)
);
CREATE INDEX connections_last_seen ON connections (last_seen_at DESC, id DESC);
CREATE INDEX connections_agent ON connections (agent_id);

CREATE TABLE trust_changes (
    id BIGSERIAL PRIMARY KEY,
    connection_id UUID NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    from_level VARCHAR(16) NOT NULL,
    to_level VARCHAR(16) NOT NULL,
    reason TEXT NOT NULL,
    changed_by VARCHAR(128) NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX trust_changes_connection ON trust_changes (connection_id, id DESC);

-- An "ask" decision waiting for the owner of its target or an admin. Expired lazily (status read with
-- expires_at) and marked by one replica at a time so watchers hear of it.
CREATE TABLE approvals (
    id UUID PRIMARY KEY,
    status VARCHAR(16) NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    caller VARCHAR(600) NOT NULL,
    -- The principal that asked (who may read it), and the agent whose owner may answer.
    requested_by VARCHAR(128) NOT NULL,
    action VARCHAR(64) NOT NULL,
    target VARCHAR(600) NOT NULL,
    target_agent_id VARCHAR(64) NOT NULL,
    target_owner VARCHAR(128) NOT NULL DEFAULT '',
    purpose TEXT NOT NULL DEFAULT '',
    reasons TEXT[] NOT NULL DEFAULT '{}',
    policy_ids TEXT[] NOT NULL DEFAULT '{}',
    grant_action VARCHAR(64) NOT NULL,
    grant_target VARCHAR(600) NOT NULL,
    grant_duration_seconds BIGINT NOT NULL,
    grant_uses BIGINT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    decided_by VARCHAR(128) NOT NULL DEFAULT '',
    decided_at TIMESTAMPTZ,
    note TEXT NOT NULL DEFAULT '',
    grant_id UUID
);
CREATE INDEX approvals_created ON approvals (created_at DESC, id DESC);
CREATE INDEX approvals_pending ON approvals (expires_at) WHERE status = 'pending';

-- A permit for one caller, action and target until expires_at; uses_left NULL means unlimited. Part of the
-- policy set: every change bumps policy_set_version in the same transaction.
CREATE TABLE grants (
    id UUID PRIMARY KEY,
    caller VARCHAR(600) NOT NULL,
    holder VARCHAR(128) NOT NULL,
    action VARCHAR(64) NOT NULL,
    target VARCHAR(600) NOT NULL,
    target_agent_id VARCHAR(64) NOT NULL,
    target_owner VARCHAR(128) NOT NULL DEFAULT '',
    expires_at TIMESTAMPTZ NOT NULL,
    uses_left BIGINT CHECK (uses_left IS NULL OR uses_left >= 0),
    approval_id UUID,
    granted_by VARCHAR(128) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);
CREATE INDEX grants_created ON grants (created_at DESC, id DESC);
CREATE INDEX grants_live ON grants (expires_at) WHERE revoked_at IS NULL;
