"""The messaging service: durable agent-to-agent messages, inboxes, delivery to external agents, dead letters."""
