-- The federation credential this mesh issued to a peer in the invitation handshake that created it: deleting the
-- peer revokes it, so a mesh that is forgotten here can no longer call in with what the handshake gave it.
ALTER TABLE federation_peers ADD COLUMN issued_credential_id TEXT;
