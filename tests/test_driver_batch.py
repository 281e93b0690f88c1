"""The drivers' default ``send_batch``: one connection check and one deadline for the
batch, a result per event in order, a late send cancelled and retried, never raised."""

from __future__ import annotations

import asyncio

import pytest

from mesh.envelope import Event
from mesh.errors import ValidationError
from mesh.registry import Target, TargetKind
from services.egress.drivers.base import Driver


class Fake(Driver):
    kind = "fake"

    def __init__(self, timeout_s: float = 0.3) -> None:
        super().__init__(Target(name="fake", kind=TargetKind.WEBHOOK, timeout_s=timeout_s))
        self.opened = 0
        self.closed = 0
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def _open(self) -> None:
        self.opened += 1

    async def _shut(self) -> None:
        self.closed += 1

    async def _send(self, event: Event) -> None:
        self.started.append(event.type)
        try:
            if event.type == "slow.one":
                await asyncio.sleep(10)
            elif event.type == "bad.one":
                raise ValidationError("no topic for this event")
            elif event.type == "cut.one":
                raise ConnectionResetError("peer went away")
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.append(event.type)
            raise


def events(*types: str) -> list[Event]:
    return [Event(source="shop", type=t, data={"n": i}) for i, t in enumerate(types)]


async def test_all_delivered_in_order_on_one_connection() -> None:
    d = Fake()
    results = await d.send_batch(events("a.one", "b.one", "c.one"))
    assert [r.ok for r in results] == [True, True, True]
    assert d.started == ["a.one", "b.one", "c.one"]  # started in the batch's order
    assert d.opened == 1 and d.closed == 0


async def test_one_failure_is_that_events_alone() -> None:
    d = Fake()
    results = await d.send_batch(events("a.one", "bad.one", "c.one"))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].permanent and "no topic" in (results[1].error or "")
    assert d.closed == 1  # the base driver drops its connection after any failure


async def test_late_sends_time_out_alone_and_are_cancelled() -> None:
    d = Fake(timeout_s=0.2)
    results = await d.send_batch(events("a.one", "slow.one", "c.one"))
    assert [r.ok for r in results] == [True, False, True]
    assert not results[1].permanent and "timeout after 0.2s" in (results[1].error or "")
    assert d.cancelled == ["slow.one"]
    assert d.closed == 1


async def test_a_cut_connection_is_retried_and_dropped() -> None:
    d = Fake()
    results = await d.send_batch(events("cut.one", "b.one"))
    assert not results[0].ok and not results[0].permanent
    assert results[1].ok
    assert d.closed == 1


async def test_cancelling_the_batch_cancels_its_sends() -> None:
    d = Fake(timeout_s=30)
    task = asyncio.ensure_future(d.send_batch(events("slow.one", "slow.one")))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert d.cancelled == ["slow.one", "slow.one"]
