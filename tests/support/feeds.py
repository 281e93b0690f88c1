"""Reading a target's feed in tests: collect with a deadline, check what is queued."""

from __future__ import annotations

import asyncio

from mesh.client import MeshClient
from mesh.envelope import Event
from tests.support import eventually as eventually  # re-exported for the feed tests


async def collect(
    client: MeshClient,
    target: str,
    want: int,
    *,
    timeout: float = 10.0,
    settle: float = 0.3,
    ack: bool = True,
) -> list[Event]:
    """Read ``target``'s feed until ``want`` events came (then ``settle`` seconds more, to
    catch extras) or ``timeout`` passed. Acks each event unless ``ack`` is False."""
    got: list[Event] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    deadline = loop.call_later(timeout, stop.set)
    settle_handle: asyncio.TimerHandle | None = None
    if want == 0:
        settle_handle = loop.call_later(settle, stop.set)
    try:
        async for d in client.consume(target, batch=10, expires=0.25, stop=stop):
            got.append(d.event)
            if ack:
                await d.ack()
            if len(got) == want and settle_handle is None:
                settle_handle = loop.call_later(settle, stop.set)
    finally:
        deadline.cancel()
        if settle_handle is not None:
            settle_handle.cancel()
    return got


async def queued(client: MeshClient, target: str) -> int:
    """Events waiting for ``target`` (not yet delivered, or delivered and unacked)."""
    found = await client.target_or_error(target)
    info = await client.js.consumer_info(client.names.events, found.consumer)
    return int((info.num_pending or 0) + (info.num_ack_pending or 0))


async def stream_count(client: MeshClient, stream: str | None = None) -> int:
    info = await client.js.stream_info(stream or client.names.events)
    return int(info.state.messages)
