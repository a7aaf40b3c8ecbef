-- Tables of the discovery-aggregator: peers' agents as last fetched, and one row per peer per federated search.
--
-- peer_id is the id of a row in federation_peers, which the registry owns. It is deliberately not declared as
-- REFERENCES federation_peers(id) ON DELETE CASCADE (as the seed has it): services own their tables and talk
-- through gRPC only, so this schema must not depend on the registry's migrations having run first, nor block
-- the registry from changing its own table. A deleted peer's rows expire (expires_at) and are purged here, and
-- ClearPeerCache removes them at once.
CREATE TABLE federated_agents_cache (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    peer_id UUID NOT NULL,
    agent_data JSONB NOT NULL,
    agent_did VARCHAR(255) NOT NULL,
    cached_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX idx_cache_peer_id ON federated_agents_cache (peer_id);
CREATE INDEX idx_cache_expires ON federated_agents_cache (expires_at);
CREATE UNIQUE INDEX idx_cache_did_peer ON federated_agents_cache (agent_did, peer_id);

-- The seed's troubleshooting query (peer_id, response_time_ms, created_at) works on it as written.
CREATE TABLE federation_query_log (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    peer_id UUID NOT NULL,
    peer_name VARCHAR(255) NOT NULL DEFAULT '',
    status VARCHAR(16) NOT NULL CHECK (status IN ('ok', 'failed', 'timeout', 'skipped')),
    response_time_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    result_count INTEGER NOT NULL DEFAULT 0,
    from_cache BOOLEAN NOT NULL DEFAULT false,
    error TEXT NOT NULL DEFAULT '',
    query_hash CHAR(64) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX idx_federation_query_log_created ON federation_query_log (created_at);
CREATE INDEX idx_federation_query_log_peer ON federation_query_log (peer_id, created_at);
