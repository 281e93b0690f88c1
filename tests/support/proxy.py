"""A TCP proxy for fault injection, in the spirit of asyncpg's ``TCPFuzzingProxy``.

Put it between a client and a server (PostgreSQL, nats-server), then cut the
line and mend it::

    async with TCPProxy("127.0.0.1", 5432) as proxy:
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
        ...
        proxy.trigger_connectivity_loss()        # drop every connection, refuse new ones
        proxy.trigger_connectivity_loss("blackhole")  # or: accept, then never answer
        proxy.restore_connectivity()

It runs on the event loop of the test that starts it, so a client under test
must live in another process or be driven by that same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Coroutine
from types import TracebackType
from typing import Any


class Mode(enum.Enum):
    UP = "up"
    REFUSE = "refuse"  # accept and reset at once: the client sees a dropped connection
    BLACKHOLE = "blackhole"  # accept and say nothing: the client sees a timeout


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class TCPProxy:
    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        self.mode = Mode.UP
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def live_connections(self) -> int:
        return len(self._links)

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def trigger_connectivity_loss(self, mode: Mode | str = Mode.REFUSE) -> None:
        """Drop every open connection; until restored, refuse or blackhole new ones."""
        mode = Mode(mode)
        if mode is Mode.UP:
            raise ValueError("use restore_connectivity() to bring the line back")
        self.mode = mode
        self._drop_all()

    def restore_connectivity(self) -> None:
        """Forward new connections again. Blackholed ones are dropped: they never worked."""
        self.mode = Mode.UP
        self._drop_all()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._drop_all()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def __aenter__(self) -> TCPProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---------------------------------------------------------------------

    def _drop_all(self) -> None:
        for link in list(self._links):
            link.abort()
        self._links.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode is Mode.REFUSE:
            writer.transport.abort()
            return
        link = _Link(writer)
        self._links.add(link)
        if self.mode is Mode.BLACKHOLE:
            # Swallow whatever the client sends until the link is dropped.
            self._spawn(self._pump(reader, None, link))
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), 5.0
            )
        except (OSError, TimeoutError):
            self._close(link)
            return
        if link not in self._links:  # dropped while we were connecting
            up_writer.transport.abort()
            return
        link.upstream = up_writer
        self._spawn(self._pump(reader, up_writer, link))
        self._spawn(self._pump(up_reader, writer, link))

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | None,
        link: _Link,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if writer is not None:
                    writer.write(data)
                    await writer.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            self._close(link)

    def _close(self, link: _Link) -> None:
        # One side ended: end the other, so the peer sees what the proxy saw.
        if link in self._links:
            self._links.discard(link)
            for w in (link.client, link.upstream):
                if w is not None:
                    w.close()
