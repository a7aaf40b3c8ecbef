"""The health-monitor service: peer and agent health checks, history, and the change stream."""
