"""The JSON Schema (draft 2020-12) of the message format, as a sender writes it; its bounds are model.py's."""

from __future__ import annotations

import functools
from typing import Any

from agentvault_messaging import model

_ID = {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"}
_UUID = {"type": "string", "format": "uuid"}


@functools.cache
def message_schema() -> dict[str, Any]:
    part = {
        "type": "object",
        "description": "One piece of content, shaped like A2A 1.0's Part: exactly one of text, raw, url, data.",
        "properties": {
            "text": {"type": "string"},
            "raw": {"type": "string", "contentEncoding": "base64"},
            "url": {"type": "string", "format": "uri", "maxLength": model.MAX_URL, "pattern": "^https?://"},
            "data": {"description": "any JSON value"},
            "metadata": {"type": "object"},
            "filename": {"type": "string", "maxLength": model.MAX_NAME},
            "media_type": {"type": "string", "maxLength": model.MAX_NAME},
        },
        "oneOf": [{"required": [k]} for k in ("text", "raw", "url", "data")],
        "additionalProperties": False,
    }
    party = {
        "type": "object",
        "properties": {
            "agent_id": _UUID,
            "did": {"type": "string", "maxLength": model.MAX_DID},
            "mesh": {"type": "string", "maxLength": model.MAX_MESH},
        },
        "anyOf": [{"required": ["agent_id"]}, {"required": ["did"]}],
        "additionalProperties": False,
    }
    strings = {
        "type": "array",
        "maxItems": model.MAX_LIST,
        "items": {"type": "string", "maxLength": model.MAX_LIST_ITEM},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://agentvault.dev/schemas/message/v1.json",
        "title": "AgentVault Mesh message, format version 1",
        "description": (
            "A message as sent to POST /api/v1/messages (and MessagingService.SendMessage). The mesh sets sender, "
            f"status and times. At most {model.DEFAULT_MAX_BYTES} bytes serialized by default "
            "(MESSAGING_MAX_MESSAGE_BYTES); larger is refused with 413."
        ),
        "type": "object",
        "properties": {
            "id": _UUID,
            "format_version": {"enum": sorted(model.FORMAT_VERSIONS)},
            "recipient": party,
            "conversation_id": _ID,
            "correlation_id": _ID,
            "in_reply_to": _UUID,
            "parts": {"type": "array", "maxItems": model.MAX_PARTS, "items": part},
            "streaming": {"type": "boolean"},
            "headers": {
                "type": "object",
                "maxProperties": model.MAX_HEADERS,
                "propertyNames": {"pattern": "^[A-Za-z0-9._-]{1,128}$"},
                "additionalProperties": {"type": "string", "maxLength": model.MAX_HEADER_VALUE},
            },
            "expire_time": {"type": "string", "format": "date-time"},
            "idempotency_key": _ID,
            "metadata": {"type": "object"},
            "task_id": _ID,
            "role": {"enum": list(model.ROLES)},
            "extensions": strings,
            "reference_task_ids": strings,
        },
        "anyOf": [{"required": ["recipient"]}, {"required": ["in_reply_to"]}],
        # A message sent open (streaming) may have no part yet; any other has at least one.
        "if": {"required": ["streaming"], "properties": {"streaming": {"const": True}}},
        "else": {"required": ["parts"], "properties": {"parts": {"minItems": 1}}},
        "additionalProperties": True,
    }
