"""The federation bench's network stand-ins: a peer that never answers, and proxies that delay every byte."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class SilentPeer:
    """A TCP server on 127.0.0.1 that accepts every connection, reads and discards, and never sends a byte."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> int:
        self._thread = threading.Thread(target=self._run, name="silent-peer", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the silent peer did not start")
        return self.port

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.add(writer)
            try:
                while await reader.read(65536):
                    pass
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                self._writers.discard(writer)
                writer.close()

        self._server = loop.run_until_complete(asyncio.start_server(swallow, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        loop.run_forever()
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


class DelayProxies:
    """TCP proxies on 127.0.0.1 that deliver every byte `delay` seconds late in each direction, in order: a
    round trip of 2 * delay between discovery and a peer, as between meshes on different machines."""

    def __init__(self, delay_seconds: float) -> None:
        self.delay = delay_seconds
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxies", daemon=True)
        self._servers: list[asyncio.Server] = []

    def start(self) -> None:
        self._thread.start()

    def add(self, target: str) -> str:
        """A proxy to `target` (host:port); returns its own host:port."""
        host, _, port = target.rpartition(":")
        server = asyncio.run_coroutine_threadsafe(self._serve(host, int(port)), self._loop).result(10)
        self._servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def _serve(self, host: str, port: int) -> asyncio.Server:
        async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                return
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            except (ConnectionError, asyncio.CancelledError):
                # Shutting down or a side hung up: either way this connection is over. (Not re-raised:
                # asyncio's stream callback would report a cancelled handler as an error.)
                writer.close()
                up_writer.close()

        return await asyncio.start_server(connect, "127.0.0.1", 0)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await pending.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                sink.write(data)
                await sink.drain()
            sink.close()

        delivery = asyncio.create_task(deliver())
        try:
            while data := await source.read(256 * 1024):
                pending.put_nowait((loop.time() + self.delay, data))
            pending.put_nowait((loop.time() + self.delay, b""))
            await delivery
        except ConnectionError:
            delivery.cancel()
        except asyncio.CancelledError:
            delivery.cancel()
            raise

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            for server in self._servers:
                server.close()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
