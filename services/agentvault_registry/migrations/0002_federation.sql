-- Federation: the peers this mesh queries, and the credentials it issued to meshes that query it.
-- federation_peers keeps the seed's columns; api_key holds a Fernet token (the key encrypted at rest).
CREATE TABLE federation_peers (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(255) NOT NULL,
    registry_url VARCHAR(500) UNIQUE NOT NULL,
    api_key TEXT,
    is_active BOOLEAN NOT NULL DEFAULT true,
    last_sync TIMESTAMPTZ,
    last_health_check TIMESTAMPTZ,
    health_status VARCHAR(50) NOT NULL DEFAULT 'unknown',
    agent_count INTEGER NOT NULL DEFAULT 0,
    metadata JSONB NOT NULL DEFAULT '{}',
    protocol VARCHAR(16) NOT NULL DEFAULT 'auto' CHECK (protocol IN ('auto', 'grpc', 'rest')),
    grpc_endpoint VARCHAR(300) NOT NULL DEFAULT '',
    require_mtls BOOLEAN NOT NULL DEFAULT false,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    is_down BOOLEAN NOT NULL DEFAULT false,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX idx_federation_peers_active ON federation_peers (is_active);

-- The receiving side must know a peer's token to check its HMAC signatures, so the token is kept
-- encrypted (not hashed); the id in the token makes the lookup O(1).
CREATE TABLE federation_credentials (
    id VARCHAR(32) PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    token_encrypted TEXT NOT NULL,
    created_by VARCHAR(128) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ
);

CREATE INDEX idx_federation_credentials_created ON federation_credentials (created_at DESC, id DESC);

-- Every query a peer made to this mesh (the discovery service logs the queries this mesh makes in
-- federation_query_log, which it owns).
CREATE TABLE federation_inbound_log (
    id BIGSERIAL PRIMARY KEY,
    credential_id VARCHAR(32) NOT NULL,
    peer_name VARCHAR(128) NOT NULL,
    peer_registry VARCHAR(255) NOT NULL DEFAULT '',
    method VARCHAR(128) NOT NULL,
    query JSONB NOT NULL DEFAULT '{}',
    result_count INTEGER NOT NULL DEFAULT 0,
    response_time_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX idx_federation_inbound_log_created ON federation_inbound_log (created_at);
