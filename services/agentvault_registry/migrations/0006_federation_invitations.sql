-- One-time invitations this mesh issued to peer meshes (the invitation handshake). The private X25519 key and the
-- one-time secret are Fernet-encrypted (FEDERATION_ENCRYPTION_KEYS): the secret must be read back, as it checks the
-- redeemer's proof and salts the key derivation. The private key is erased when the invitation is redeemed.
CREATE TABLE federation_invitations (
    id UUID PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    private_key_encrypted TEXT,
    secret_encrypted TEXT NOT NULL,
    -- What the code carried besides the secret, so a redeemer's proof can be checked even after the private key
    -- is gone (a second redemption is then told "already redeemed", not "invalid").
    public_key BYTEA NOT NULL,
    inviter_url VARCHAR(500) NOT NULL,
    created_by VARCHAR(128) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    redeemed_at TIMESTAMPTZ,
    redeemed_by VARCHAR(500) NOT NULL DEFAULT '',
    credential_id VARCHAR(32) NOT NULL DEFAULT ''
);

CREATE INDEX idx_federation_invitations_created ON federation_invitations (created_at DESC, id DESC);
