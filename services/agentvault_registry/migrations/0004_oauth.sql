-- The mesh as an OAuth 2.0 authorization server: its clients, refresh tokens and signing keys.
CREATE TABLE oauth_clients (
    client_id VARCHAR(64) PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    -- SHA-256 of the random secret (256 bits of entropy, so a fast hash is enough); NULL for private_key_jwt only.
    secret_hash BYTEA,
    scopes TEXT[] NOT NULL,
    grant_types TEXT[] NOT NULL,
    token_endpoint_auth_method VARCHAR(32) NOT NULL DEFAULT 'client_secret_basic',
    agent_id UUID REFERENCES agents (id) ON DELETE CASCADE,
    -- The client's public JWK Set for private_key_jwt, as it was registered (at most 8 KiB).
    jwks TEXT NOT NULL DEFAULT '',
    owner_principal_id VARCHAR(40) NOT NULL REFERENCES principals (id),
    kind VARCHAR(16) NOT NULL DEFAULT 'agent' CHECK (kind IN ('person', 'agent', 'service', 'peer')),
    disabled BOOLEAN NOT NULL DEFAULT false,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX idx_oauth_clients_created ON oauth_clients (created_at DESC, client_id DESC);

-- Rotated on every use; a token used twice revokes its whole family (RFC 6819 5.2.2.3, OAuth 2.0 Security BCP).
CREATE TABLE oauth_refresh_tokens (
    id VARCHAR(32) PRIMARY KEY,
    family_id VARCHAR(32) NOT NULL,
    client_id VARCHAR(64) NOT NULL REFERENCES oauth_clients (client_id) ON DELETE CASCADE,
    subject VARCHAR(128) NOT NULL,
    scopes TEXT[] NOT NULL,
    secret_hash BYTEA NOT NULL,
    -- The access token issued with this refresh token, revoked with the family on reuse.
    access_jti VARCHAR(64) NOT NULL,
    access_exp TIMESTAMPTZ NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    used_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);

CREATE INDEX idx_oauth_refresh_family ON oauth_refresh_tokens (family_id);
CREATE INDEX idx_oauth_refresh_client ON oauth_refresh_tokens (client_id);
CREATE INDEX idx_oauth_refresh_expires ON oauth_refresh_tokens (expires_at);

-- Access token signing keys. The private JWK is encrypted with FEDERATION_ENCRYPTION_KEYS (agentvault.common.secretbox).
-- A key signs until retire_at; it stays in the JWKS until expire_at, when the last token it signed has expired.
CREATE TABLE oauth_signing_keys (
    kid VARCHAR(64) PRIMARY KEY,
    private_jwk_encrypted BYTEA NOT NULL,
    public_jwk JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    retire_at TIMESTAMPTZ NOT NULL,
    expire_at TIMESTAMPTZ NOT NULL
);

-- Named chores (signing key rotation) run by one replica at a time (agentvault.common.lease).
CREATE TABLE oauth_leases (
    chore_kind VARCHAR(16) NOT NULL,
    chore_id VARCHAR(64) NOT NULL,
    next_check_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by VARCHAR(128) NOT NULL DEFAULT '',
    claimed_at TIMESTAMPTZ,
    PRIMARY KEY (chore_kind, chore_id)
);
