"""Runs the HTTP edge: `agentvault-edge` (settings from the environment)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from agentvault.common.logs import configure_logging
from agentvault.common.server import run_loop
from agentvault.common.settings import SettingsError
from agentvault.common.tracing import configure_tracing
from agentvault_edge.app import create_app
from agentvault_edge.routes import api_of, discover_services
from agentvault_edge.server import EdgeRunner
from agentvault_edge.settings import EdgeSettings

log = logging.getLogger(__name__)


async def serve(settings: EdgeSettings, app: web.Application) -> None:
    runner = EdgeRunner(app, settings)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind_host, settings.port)
    await site.start()
    log.info("edge listening", extra={"host": settings.bind_host, "port": settings.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("edge shutting down")
    finally:
        # Stops accepting, lets in-flight requests finish within the grace period, then closes the channels.
        await runner.shutdown_gracefully(settings.shutdown_grace_seconds)


def main() -> int:
    try:
        services = discover_services()
        apis = {api for api in (api_of(s) for s in services) if api}
        settings = EdgeSettings.load(apis)
    except SettingsError as exc:
        print(f"agentvault-edge: {exc}", file=sys.stderr)
        return 2
    configure_logging("edge", settings.log_level, settings.log_format)
    configure_tracing("edge")
    run_loop(serve(settings, create_app(settings, services)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
