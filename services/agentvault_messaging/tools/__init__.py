"""Tools over MCP: the catalog of registered MCP servers' tools, and invoking them under the policy engine."""
