-- Messages handed to peer meshes: when the peer is next asked what became of one (federation.StatusFollower).
ALTER TABLE messages ADD COLUMN federation_check_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX idx_messages_federation_check ON messages (federation_check_at)
    WHERE transport = 'federation' AND status IN ('held', 'delivered');
