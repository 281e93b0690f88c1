"""publish_many: a sliding window of acknowledgements, duplicates counted, errors as one
BrokerError (real nats-server)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import BrokerError
from tests.support.feeds import stream_count


async def test_more_events_than_the_window_all_stored(client: MeshClient) -> None:
    events = [client.build("shop", "order.created", {"n": i}) for i in range(203)]
    events += [client.build("shop", "order.created", {"n": 0}, id=events[0].id)]
    assert await client.publish_many(events, window=7) == 203
    assert await stream_count(client) == 203
    assert await client.publish_many([]) == 0


async def test_no_stream_is_one_broker_error(settings: Settings) -> None:
    """Before `mesh init` nothing stores mesh.evt.>: the error says so, nothing leaks."""
    unhandled: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx.get("message")))
    async with MeshClient(settings, name="test") as c:
        events = [c.build("shop", "order.created", {"n": i}) for i in range(150)]
        with pytest.raises(BrokerError, match="mesh init"):
            await c.publish_many(events, window=100, timeout=5)
        await asyncio.sleep(0.2)  # late answers for the rest arrive
    gc.collect()
    await asyncio.sleep(0)
    assert not [m for m in unhandled if "never retrieved" in str(m)]
