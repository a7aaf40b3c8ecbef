-- Agents and their capabilities. Capabilities are kept twice on purpose: as JSONB on the agent row, so a
-- read is one index lookup, and normalized in agent_capabilities, so kind/name/version filters use an index.
CREATE TABLE agents (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    did VARCHAR(255) NOT NULL,
    name VARCHAR(200) NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    version VARCHAR(64) NOT NULL,
    agent_type VARCHAR(64) NOT NULL DEFAULT '',
    capabilities JSONB NOT NULL DEFAULT '[]',
    endpoints JSONB NOT NULL DEFAULT '[]',
    tags TEXT[] NOT NULL DEFAULT '{}',
    owner VARCHAR(128) NOT NULL,
    sharing VARCHAR(16) NOT NULL DEFAULT 'local' CHECK (sharing IN ('private', 'local', 'federated')),
    health_check_url VARCHAR(2048) NOT NULL DEFAULT '',
    health_status VARCHAR(16) NOT NULL DEFAULT 'unknown',
    search_vector TSVECTOR NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT agents_did_key UNIQUE (did)
);

CREATE INDEX idx_agents_search ON agents USING GIN (search_vector);
CREATE INDEX idx_agents_tags ON agents USING GIN (tags);
CREATE INDEX idx_agents_type_created ON agents (agent_type, created_at DESC, id DESC);
CREATE INDEX idx_agents_created ON agents (created_at DESC, id DESC);
CREATE INDEX idx_agents_owner ON agents (owner);
CREATE INDEX idx_agents_sharing ON agents (sharing) WHERE sharing = 'federated';

CREATE TABLE agent_capabilities (
    agent_id UUID NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    kind VARCHAR(8) NOT NULL CHECK (kind IN ('tool', 'skill', 'model')),
    name VARCHAR(128) NOT NULL,
    version VARCHAR(64) NOT NULL DEFAULT '',
    -- Semantic version as orderable integers; release is 1 for releases, 0 for pre-releases.
    -- NULL when the capability is unversioned, so no version constraint matches it.
    v_major INTEGER,
    v_minor INTEGER,
    v_patch INTEGER,
    v_release SMALLINT,
    description TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (agent_id, kind, name)
);

CREATE INDEX idx_capabilities_lookup ON agent_capabilities (name, kind, v_major, v_minor, v_patch, v_release);

CREATE TABLE api_keys (
    id VARCHAR(32) PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    role VARCHAR(16) NOT NULL CHECK (role IN ('member', 'admin')),
    -- SHA-256 of the random secret: the secret has 256 bits of entropy, so a fast hash is enough.
    secret_hash BYTEA NOT NULL,
    created_by VARCHAR(128) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);

CREATE INDEX idx_api_keys_created ON api_keys (created_at DESC, id DESC);
