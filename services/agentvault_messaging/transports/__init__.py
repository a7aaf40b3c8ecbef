"""Delivery to external agents, one module per agent protocol; see base.py for the interface and the registry."""
