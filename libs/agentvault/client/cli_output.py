"""How `agentvault` prints a reply: JSON the way the REST API does, or tables (`-o table`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# Columns of `-o table`, by the list a reply carries; a command may override them (discover's agents).
LIST_COLUMNS: dict[str, tuple[str, ...]] = {
    "agents": ("id", "did", "name", "version", "agent_type", "sharing", "owner", "health_status"),
    "api_keys": ("id", "name", "role", "principal_id", "create_time", "revoke_time"),
    "peers": ("id", "name", "registry_url", "protocol", "is_active", "health_status", "agent_count", "is_down"),
    "credentials": ("id", "name", "create_time", "revoke_time", "last_used_time"),
    "clients": ("client_id", "name", "scopes", "grant_types", "agent_id", "disabled", "create_time"),
    "policies": ("id", "name", "enabled", "description", "created_by", "update_time"),
    "approvals": ("id", "status", "caller", "action", "target", "purpose", "create_time", "expire_time"),
    "grants": ("id", "caller", "action", "target", "uses_left", "expire_time", "granted_by", "revoke_time"),
    "connections": (
        "id",
        "caller_kind",
        "caller_id",
        "agent_id",
        "trust_level",
        "interactions",
        "violations",
        "last_seen_time",
    ),
    "changes": ("change_time", "from_level", "to_level", "changed_by", "reason"),
    "decisions": ("decide_time", "outcome", "caller", "action", "target", "reason"),
    # A dotted column reads a nested field.
    "messages": (
        "id",
        "status",
        "sender.agent_id",
        "recipient.agent_id",
        "conversation_id",
        "in_reply_to",
        "transport",
        "attempts",
        "create_time",
        "status_reason",
    ),
    "deliveries": ("message.id", "attempt", "receipt", "message.sender.agent_id", "message.conversation_id"),
}
DISCOVERED_COLUMNS = ("did", "name", "version", "agent_type", "health_status", "registry_name", "is_federated", "score")
PEER_STAT_COLUMNS = ("name", "status", "from_cache", "result_count", "latency_ms", "error")


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        if "kind" in value and "name" in value:  # a capability, as typed on the command line
            return f"{value['kind']}:{value['name']}" + (f"@{value['version']}" if value.get("version") else "")
        if "protocol" in value and "url" in value:  # an endpoint
            return f"{value['protocol']}={value['url']}"
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


def _at(row: dict[str, Any], column: str) -> Any:
    """The value of `column` in `row`; a dotted column ("sender.agent_id") reads a nested field."""
    value: Any = row
    for key in column.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[c.upper() for c in columns]] + [[_cell(_at(row, c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _fields(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value and not {"kind", "protocol"} & value.keys():
            out += _fields(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", _cell(value)))
    return out


def _stats(stats: dict[str, Any]) -> str:
    counts = ", ".join(f"{k}={v}" for k, v in stats.items() if k != "peers")
    lines = [f"federation_stats: {counts}"]
    if stats.get("peers"):
        lines.append(_table(stats["peers"], PEER_STAT_COLUMNS))
    return "\n".join(lines)


def render(data: dict[str, Any], output: str, columns: Mapping[str, Sequence[str]] | None = None) -> str:
    """`data` as JSON, or as a table: a reply carrying a list prints it as rows, then federation_stats (discover)
    and, when there is a next page, a last line `next_page_token: TOKEN`; any other reply prints as fields."""
    if output == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    all_columns = {**LIST_COLUMNS, **(columns or {})}
    key = next((k for k in all_columns if isinstance(data.get(k), list)), None)
    if key is None:
        fields = _fields(data)
        width = max((len(k) for k, _ in fields), default=0)
        return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in fields)
    parts = [_table(data[key], all_columns[key])]
    if data.get("federation_stats"):
        parts.append(_stats(data["federation_stats"]))
    if data.get("next_page_token"):
        parts.append(f"next_page_token: {data['next_page_token']}")
    return "\n".join(parts)
