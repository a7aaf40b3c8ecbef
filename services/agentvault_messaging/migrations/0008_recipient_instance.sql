-- Per-instance inboxes: the instance of the recipient agent a message is addressed to ("" = any instance). A message
-- of a conversation whose session is held by a named instance of its owner is addressed to that instance, and only a
-- receiver naming it claims it; an acceptance re-addresses the conversation's unclaimed messages to the new owner's
-- instance. A constant default: adding the column rewrites nothing.
ALTER TABLE messages ADD COLUMN recipient_instance VARCHAR(128) NOT NULL DEFAULT '';
-- Claims keep using idx_messages_inbox (inbox, seq): the instance is one more filter on the rows that scan reads
-- from the head of the inbox, as visible_at is, so a receiver still stops after its LIMIT of claimable rows.
