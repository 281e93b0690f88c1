"""The sizes of the chunks a backlog goes out in (services/egress/batch.py): once the pace
has grown to the target's limit, a fetched batch goes out whole, not as a chunk of a few
beside another batch's chunk of the rest. Drivers pay per call (Kafka a produce request,
AMQP a socket write, Redis a pipeline, the egress a record message and an ack command
per chunk): a split that lasts the whole run is twice the calls."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

import services.egress.worker as worker_module
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.envelope import Event
from mesh.registry import Target
from services.egress.drivers.base import Driver
from services.egress.http.sender import AttemptResult
from services.egress.service import WebhookEgress
from tests.support.receiver import add_webhook, eventually

EVENTS = 2_000
LIMIT = 32
ROUND_TRIP_S = 0.01  # a destination answering a chunk after a round trip (with 3 ms the
# base split in 4 runs of 5, with 10 ms in 8 of 8)


class Recording(Driver):
    """Answers every event "delivered" after one round trip; records each call's size."""

    kind = "recording"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.chunks: list[int] = []
        self.delivered: list[str] = []
        self.out = 0  # events in calls not yet answered
        self.peak = 0

    async def _open(self) -> None:
        pass

    async def _shut(self) -> None:
        pass

    async def _send(self, event: Event) -> None:  # send_batch below covers every call
        raise AssertionError("not used")

    async def send(self, event: Event, trace: dict[str, str] | None = None) -> AttemptResult:
        return (await self.send_batch([event]))[0]

    async def send_batch(
        self, events: Sequence[Event], traces: Sequence[dict[str, str] | None] | None = None
    ) -> list[AttemptResult]:
        self.chunks.append(len(events))
        self.out += len(events)
        self.peak = max(self.peak, self.out)
        try:
            await asyncio.sleep(ROUND_TRIP_S)
        finally:
            self.out -= len(events)
        self.delivered.extend(e.id for e in events)
        return [AttemptResult(delivered=True, latency_s=ROUND_TRIP_S) for _ in events]


async def _chunks_of_a_backlog(
    settings: Settings,
    client: MeshClient,
    monkeypatch: pytest.MonkeyPatch,
    limit: int = LIMIT,
) -> Recording:
    drivers: list[Recording] = []

    def make(target: Target, *_: Any) -> Driver:
        drivers.append(Recording(target))
        return drivers[-1]

    monkeypatch.setattr(worker_module, "make_driver", make)
    await add_webhook(client, "hook", "http://127.0.0.1:9/unused", max_in_flight=limit)
    events = [Event(source="shop", type="order.created", data={"n": i}) for i in range(EVENTS)]
    await client.publish_many(events)
    egress = WebhookEgress(settings, fetch_expires_s=0.5)
    await egress.start()  # the whole backlog is there at the first fetch
    try:
        await eventually(
            lambda: _true(egress.stats()["targets"]["hook"]["delivered"] >= EVENTS),
            60,
            "the backlog delivered",
        )
    finally:
        await egress.stop()
    [driver] = drivers
    assert sorted(driver.delivered) == sorted(e.id for e in events)  # each once
    return driver


async def _true(value: bool) -> bool:
    return value


async def test_a_backlog_goes_out_in_chunks_of_the_whole_limit(
    settings: Settings, client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow start (1, 2, 4 ... 32) ends with a batch left with one event beside the next
    batch; they used to go out as chunks of 1 and 31 for the rest of the run (twice the
    calls, half of them of one event). Now a batch waits for the wire rather than send a
    sliver (``Pace.fits``), so after slow start every chunk is a whole batch."""
    driver = await _chunks_of_a_backlog(settings, client, monkeypatch)
    sizes = driver.chunks
    # Slow start is a handful of small chunks (1, 2, 4, 8, 16, a remainder); a split that
    # lasts is one small chunk per batch: ~2,000 / 32 of them (base: 136-144 calls).
    small = [s for s in sizes if s < LIMIT // 2]
    assert len(small) <= 12, (len(sizes), sizes[:80])
    assert len(sizes) <= EVENTS / LIMIT + 12, (len(sizes), sizes[:80])  # 68 in a quiet run
    assert driver.peak <= LIMIT


async def test_over_the_largest_batch_a_limit_is_whole_batches_side_by_side(
    settings: Settings, client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 in flight: batches of 50 (not 64, whose second could only go once the first is
    back, leaving 36 places empty), two of them on the wire at once."""
    driver = await _chunks_of_a_backlog(settings, client, monkeypatch, limit=100)
    sizes = driver.chunks
    assert len([s for s in sizes if s < 25]) <= 12, (len(sizes), sizes[:80])
    assert len(sizes) <= EVENTS / 50 + 12, (len(sizes), sizes[:80])
    assert max(sizes) == 50
    assert 64 < driver.peak <= 100
