-- The health monitor's own tables. Subjects are federation peers and agents, named by the registry's ids;
-- nothing here references the registry's tables, which another service owns.

-- One row per check; pruned after HEALTH_HISTORY_RETENTION.
CREATE TABLE health_checks (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject_kind VARCHAR(16) NOT NULL CHECK (subject_kind IN ('peer', 'agent')),
    subject_id VARCHAR(64) NOT NULL,
    status VARCHAR(16) NOT NULL CHECK (status IN ('healthy', 'unhealthy', 'timeout', 'unreachable', 'error')),
    response_time_ms DOUBLE PRECISION NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    -- When the check started; with leases, consecutive starts of one subject are an interval apart.
    checked_at TIMESTAMPTZ NOT NULL,
    -- Which replica ran it, so work sharing can be seen.
    checked_by VARCHAR(128) NOT NULL
);

-- History and summaries read one subject's recent rows.
CREATE INDEX idx_health_checks_subject ON health_checks (subject_kind, subject_id, checked_at DESC);
-- Pruning deletes by age.
CREATE INDEX idx_health_checks_checked_at ON health_checks (checked_at);

-- Latest state per subject, including the consecutive-failure count every replica must share.
CREATE TABLE health_state (
    subject_kind VARCHAR(16) NOT NULL,
    subject_id VARCHAR(64) NOT NULL,
    name VARCHAR(255) NOT NULL DEFAULT '',
    status VARCHAR(16) NOT NULL,
    response_time_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    is_down BOOLEAN NOT NULL DEFAULT false,
    agent_count INTEGER,
    last_check TIMESTAMPTZ NOT NULL,
    last_success TIMESTAMPTZ,
    PRIMARY KEY (subject_kind, subject_id)
);

-- The schedule the replicas share: a replica claims due rows with FOR UPDATE SKIP LOCKED and moves
-- next_check_at one interval ahead in the same statement, so no two replicas check a subject in one interval.
CREATE TABLE health_leases (
    subject_kind VARCHAR(16) NOT NULL,
    subject_id VARCHAR(64) NOT NULL,
    next_check_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by VARCHAR(128) NOT NULL DEFAULT '',
    claimed_at TIMESTAMPTZ,
    PRIMARY KEY (subject_kind, subject_id)
);

CREATE INDEX idx_health_leases_due ON health_leases (next_check_at);
