"""The registry's own records beside the shared agent rules (agentvault.common.agents)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: str
    principal_id: str
    created_at: datetime
    revoked_at: datetime | None = None
