-- Offers from peer meshes that this mesh's policy answers "ask" for (session_federation.py): held, with the
-- approval's id, until the approval is answered (then offered, or refused); the offering mesh's deadline still bounds
-- them (it concludes them "aborted" when it passes first).
ALTER TABLE incoming_handoffs DROP CONSTRAINT incoming_handoffs_status_check;
ALTER TABLE incoming_handoffs ADD CONSTRAINT incoming_handoffs_status_check CHECK (status IN (
    'held', 'offered', 'prepared', 'accepted', 'rejected', 'refused', 'expired', 'aborted'
));
ALTER TABLE incoming_handoffs ADD COLUMN approval_id UUID;
CREATE INDEX idx_incoming_handoffs_approval ON incoming_handoffs (approval_id) WHERE status = 'held';
