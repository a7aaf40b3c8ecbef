-- Ownership by a stable principal id. An agent's owner used to be the name of the API key that created it, and
-- names are not unique: any key issued with the same name (or named like the bootstrap admin) owned its agents.
-- A principal id is random, assigned by the registry, and never chosen by a caller.
CREATE TABLE principals (
    id VARCHAR(40) PRIMARY KEY,
    -- Display name only; several principals may share one.
    name VARCHAR(128) NOT NULL,
    kind VARCHAR(16) NOT NULL DEFAULT 'person' CHECK (kind IN ('person', 'agent', 'service', 'peer')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The bootstrap admin token's principal; reserved, never given to an API key.
INSERT INTO principals (id, name) VALUES ('prn_bootstrap_admin', 'admin');

-- Each existing key becomes a principal of its own.
ALTER TABLE api_keys ADD COLUMN principal_id VARCHAR(40);
UPDATE api_keys SET principal_id = 'prn_' || replace(gen_random_uuid()::text, '-', '');
INSERT INTO principals (id, name, created_at) SELECT principal_id, name, created_at FROM api_keys;
ALTER TABLE api_keys
    ALTER COLUMN principal_id SET NOT NULL,
    ADD CONSTRAINT api_keys_principal_fk FOREIGN KEY (principal_id) REFERENCES principals (id);
CREATE INDEX idx_api_keys_principal ON api_keys (principal_id);

-- Existing agents. 'admin' was the bootstrap admin: a member key that happened to be named 'admin' loses access
-- (the safe direction; an admin can still reach and reassign them). A name held by several keys goes to the
-- first key issued with it, the one later keys of that name impersonated. A name no key holds becomes a
-- principal of its own, for which an admin can issue a key (CreateApiKey with principal_id).
INSERT INTO principals (id, name)
SELECT DISTINCT 'prn_' || md5('legacy:' || a.owner), a.owner
FROM agents a
WHERE a.owner <> 'admin' AND NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.name = a.owner);

UPDATE agents a SET owner = CASE
    WHEN a.owner = 'admin' THEN 'prn_bootstrap_admin'
    ELSE COALESCE(
        (SELECT k.principal_id FROM api_keys k WHERE k.name = a.owner ORDER BY k.created_at, k.id LIMIT 1),
        'prn_' || md5('legacy:' || a.owner)
    )
END;

ALTER TABLE agents ADD CONSTRAINT agents_owner_fk FOREIGN KEY (owner) REFERENCES principals (id);
