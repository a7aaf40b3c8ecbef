-- The MCP tool catalog's leases (tools/catalog.py, agentvault.common.lease): one replica watches each MCP server.
-- IF NOT EXISTS: meshes that ran the catalog before this migration already have the table (it made it at start).
CREATE TABLE IF NOT EXISTS tool_catalog_leases (
    subject_kind VARCHAR(16) NOT NULL,
    subject_id VARCHAR(64) NOT NULL,
    next_check_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by VARCHAR(128) NOT NULL DEFAULT '',
    claimed_at TIMESTAMPTZ,
    PRIMARY KEY (subject_kind, subject_id)
);
