-- How the mesh authenticates when it calls an agent: the configuration (never a secret) and the secret as a Fernet
-- token under FEDERATION_ENCRYPTION_KEYS (NULL when the kind has none). '{}' reads as kind none.
ALTER TABLE agents
    ADD COLUMN auth JSONB NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN auth_secret TEXT;
