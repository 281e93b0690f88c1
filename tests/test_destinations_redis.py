"""The Redis driver's own deadline: its client has no socket timeout of redis-py's (which
would wrap every response read in a timeout and every pipeline write in a task), so a
server that stops answering must still end the send at the target's timeout, as a
retry, with the client closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("redis")

from mesh.registry import TargetKind
from services.egress.drivers.redis_streams import RedisDriver
from tests.support.destinations import (
    assert_timed_out_as_retries,
    mute_target,
    server_url,
    three_events,
)


@pytest.fixture
async def mute_redis() -> AsyncIterator[str]:
    """The machine's Redis behind a relay that forwards everything until the first XADD,
    and from then on nothing (the server seems to hang)."""
    from urllib.parse import urlsplit

    upstream = urlsplit(server_url("redis"))
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, mute: bool) -> None:
        while data := await src.read(65536):
            if mute and b"XADD" in data.upper():
                return  # swallowed, and all that follows
            dst.write(data)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            upstream.hostname or "127.0.0.1", upstream.port or 6379
        )
        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            up_writer.close()
            writer.close()

    def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(serve(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(spawn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}{upstream.path or '/0'}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_server_that_stops_answering_times_out_at_the_targets_timeout(
    mute_redis: str,
) -> None:
    target = mute_target(TargetKind.REDIS, mute_redis, stream="mesh-test-mute")
    driver = RedisDriver(target, mute_redis)
    events = three_events()
    try:
        await driver.connect()
        assert driver._redis.connection_pool.connection_kwargs["socket_timeout"] is None
        started = asyncio.get_running_loop().time()
        results = await driver.send_batch(events)
        assert not driver.connected  # the client cut off mid-pipeline is closed
        single = await driver.send(events[0])
        took = asyncio.get_running_loop().time() - started
    finally:
        await driver.close()
    assert_timed_out_as_retries([*results, single], took)  # not redis-py's default of 5 s
