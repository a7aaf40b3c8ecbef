"""The agent advertisement format (an agent with its capabilities) as a versioned JSON Schema document."""

from __future__ import annotations

import json
from typing import Any

from agentvault.registry.v1 import registry_service_pb2 as pb
from agentvault_edge.openapi import _SchemaBuilder

PATH = "/schemas/agent-advertisement/v1.json"
SCHEMA_ID = "urn:agentvault:schemas:agent-advertisement:v1"


def advertisement_schema() -> dict[str, Any]:
    """The request form of registry.v1.Agent, built by the OpenAPI document's builder from the same rules (so the
    two cannot differ), with its references rewritten from the OpenAPI components to this document's $defs."""
    schemas: dict[str, Any] = {}
    root = _SchemaBuilder(schemas, request=True).message(pb.Agent.DESCRIPTOR)
    text = json.dumps({"$ref": root["$ref"], "$defs": dict(sorted(schemas.items()))})
    body = json.loads(text.replace('"#/components/schemas/', '"#/$defs/'))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "AgentVault agent advertisement, version 1",
        "description": (
            "An agent as registered (POST /api/v1/agents), with its capabilities: kind, name, semantic version, "
            "input and output JSON Schemas (as JSON text) and the permissions they require. Capabilities must be "
            "unique by (kind, name); input_schema and output_schema must themselves be valid JSON Schemas."
        ),
        **body,
    }
