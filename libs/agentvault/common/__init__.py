"""Shared runtime for every AgentVault Mesh service: settings, errors, server skeleton, storage, telemetry."""
