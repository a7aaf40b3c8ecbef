"""The edge loads the MCP SDK on the first /mcp request, not at start (its import is seconds of CPU)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ToolNet
from .test_invoke import Setup, setup  # noqa: F401 - the module fixture
from .test_mcp_edge import mesh_mcp

PROBE = """
import sys
import agentvault_edge.app  # everything the edge's process imports to start (create_app, the routes, /mcp)
from agentvault_edge.mcp_endpoint import McpEndpoint
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mcp", "mcp_types"))
print(",".join(loaded))
"""


def test_starting_the_edge_does_not_import_the_mcp_sdk() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""


async def test_concurrent_first_requests_share_one_session_manager(tnet: ToolNet, setup: Setup) -> None:  # noqa: F811
    import asyncio

    token = setup.md[0][1].removeprefix("Bearer ")

    async def listed() -> set[str]:
        async with mesh_mcp(tnet, token) as session:
            return {t.name for t in (await session.list_tools()).tools}

    answers = await asyncio.gather(*(listed() for _ in range(4)))
    assert all(f"{setup.open_id}.add" in names for names in answers)
