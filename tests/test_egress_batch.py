"""The batch-shaped egress (services/egress/batch.py): a fetched batch goes out together,
its attempts are one record message, and no event is acked before its record is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import mesh.records as records_module
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.records import DeliveryRecord, Outcome, read_delivery_message
from mesh.streams import ensure_streams
from services.egress.service import WebhookEgress
from tests.support.receiver import Receiver, add_webhook, eventually, read_stream

FETCH_S = 0.5


@pytest.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def _drained(client: MeshClient, target: str) -> bool:
    info = await client.js.consumer_info(client.names.events, f"deliver-{target}")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_backlog_goes_out_in_batches_with_one_record_message_each(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    await add_webhook(client, "hook", rx.url, max_in_flight=64)
    ids = [await client.publish("shop", "order.created", {"n": i}) for i in range(40)]
    egress = WebhookEgress(settings, fetch_expires_s=FETCH_S)
    await egress.start()  # the whole backlog is there at the first fetch
    try:
        await rx.wait_for(40)
        await eventually(lambda: _drained(client, "hook"), 10, "every event acked")
        msgs = await eventually(
            lambda: _records_of(client, "hook", 40), 10, "a record for every attempt"
        )
    finally:
        await egress.stop()
    assert set(rx.ids()) == set(ids)
    shapes = [read_delivery_message(m.data) for m in msgs]
    records = [r for recs, _ in shapes for r in recs]
    assert sorted(r.event_id for r in records) == sorted(ids)
    assert all(r.outcome == "delivered" and r.status_code == 200 for r in records)
    assert all(batch for _, batch in shapes)
    # Sent as batches: fewer record messages than attempts (a batch holds up to 32 here).
    assert len(msgs) < len(ids) / 4


async def _records_of(client: MeshClient, target: str, n: int) -> list | None:
    msgs = await read_stream(client, client.names.sys, client.subjects.delivery(target))
    total = sum(len(read_delivery_message(m.data)[0]) for m in msgs)
    return msgs if total >= n else None


async def test_no_ack_before_the_records_are_stored(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    """Without a stream for the records, delivered events are handed back, not acked;
    once the records can be stored, each is acked and nothing is lost."""
    await add_webhook(client, "hook", rx.url)
    egress = WebhookEgress(settings, fetch_expires_s=FETCH_S)
    await egress.start()  # (which makes sure the streams exist: remove one after)
    try:
        await client.js.delete_stream(client.names.sys)
        ids = [await client.publish("shop", "order.created", {"n": i}) for i in range(5)]
        await rx.wait_for(5)
        # Delivered, but the records could not be stored: sent again, not acked.
        await eventually(lambda: len(rx.requests) > 5, 10, "a redelivery")
        info = await client.js.consumer_info(client.names.events, "deliver-hook")
        assert info.num_pending + info.num_ack_pending > 0
        assert egress.stats()["records_failed"] > 0
        await ensure_streams(client.port, client.settings)
        await eventually(lambda: _drained(client, "hook"), 20, "every event acked")
        msgs = await eventually(lambda: _records_of(client, "hook", 5), 10, "the records")
    finally:
        await egress.stop()
    stored = {r.event_id for m in msgs for r in read_delivery_message(m.data)[0]}
    assert stored == set(ids)
    assert set(rx.ids()) == set(ids)


async def test_a_batch_with_nothing_to_send_still_records_and_acks(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    """Skipped and dead-lettered messages settle in the admission step: their records go
    out (and they are acked) even when the batch sends nothing at all."""
    await add_webhook(client, "hook", rx.url, source="nobody")
    await client.add_propagation("unidirectional", "shop", ["hook"], filter="data.keep <> FALSE")
    egress = WebhookEgress(settings, fetch_expires_s=FETCH_S)
    await egress.start()
    try:
        skipped = await client.publish("shop", "x", {"keep": False})
        records = await eventually(lambda: _records_of(client, "hook", 1), 10, "its record")
        await eventually(lambda: _drained(client, "hook"), 10, "the skipped event acked")
    finally:
        await egress.stop()
    [rec] = [r for m in records for r in read_delivery_message(m.data)[0]]
    assert (rec.event_id, rec.outcome) == (skipped, "skipped")
    assert not rx.requests


async def test_a_split_batch_is_acked_only_once_every_part_is_stored(
    settings: Settings, client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of attempts too large for one record message goes out as several; if the
    stream refuses one of them (here the first: its long error is over the stream's
    message size), none of the batch's events is acked: they are handed back and come
    again, even though the other parts were stored."""
    monkeypatch.setattr(records_module, "MAX_BATCH_BYTES", 400)  # one record a message
    egress = WebhookEgress(settings, fetch_expires_s=FETCH_S)
    await egress.start()
    try:
        info = await client.js.stream_info(client.names.sys)
        info.config.max_msg_size = 2_000
        await client.js.update_stream(info.config)
        for i in range(3):
            await client.publish("shop", "order.created", {"n": i})
        sub = await client.js.pull_subscribe(
            client.subjects.evt_all, durable="split", stream=client.names.events
        )
        msgs = await sub.fetch(3, timeout=5)
        recs = [
            DeliveryRecord(event_id=f"e{i}", target="hook", attempt=1, outcome=Outcome.RETRY)
            for i in range(3)
        ]
        recs[0].error = "x" * 5_000  # the first part is refused, the other two are stored
        await egress.record_batch(recs, msgs)
        await eventually(
            lambda: _true(egress.stats()["records_failed"] > 0), 15, "the refusal reported"
        )
        again = await sub.fetch(3, timeout=10)  # handed back, not acked
        assert sorted(m.metadata.sequence.stream for m in again) == sorted(
            m.metadata.sequence.stream for m in msgs
        )
        stored = await _records_of(client, "hook", 2)
        assert stored is not None  # the parts that fit were stored
    finally:
        await egress.stop()


async def _true(value: bool) -> bool:
    return value
