"""Runs a whole mesh on one machine: embedded PostgreSQL and Redis, and every service as its own process."""
