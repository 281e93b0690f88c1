"""PubPipe: pipelined JetStream publishes with a bounded window (real nats-server)."""

from __future__ import annotations

import asyncio
from typing import Any

from mesh._nats.pubpipe import PubPipe
from mesh.client import MeshClient
from mesh.records import DeliveryRecord
from tests.support.receiver import read_stream


async def test_every_message_is_stored_once_and_acknowledged(client: MeshClient) -> None:
    failures: list[tuple[Any, str]] = []
    pipe = await PubPipe(
        client.nc, window=16, on_failure=lambda t, e: failures.append((t, e))
    ).open()
    try:
        recs = [
            DeliveryRecord(event_id=f"e{i}", target="t", attempt=1, outcome="delivered")
            for i in range(100)
        ]
        for rec in recs:
            await pipe.publish(
                client.subjects.delivery("t"), rec.to_bytes(), {"Nats-Msg-Id": rec.id}, rec
            )
            assert pipe.pending <= 16
        assert await pipe.flush(10)
        assert pipe.pending == 0
    finally:
        await pipe.close()
    assert failures == []
    msgs = await read_stream(client, client.names.sys, client.subjects.delivery("t"))
    stored = [DeliveryRecord.from_bytes(m.data) for m in msgs]
    assert [r.id for r in stored] == [r.id for r in recs]


async def test_a_refused_message_is_tried_again_then_reported(client: MeshClient) -> None:
    failures: list[tuple[Any, str]] = []
    pipe = await PubPipe(
        client.nc, attempts=2, on_failure=lambda t, e: failures.append((t, e))
    ).open()
    try:
        # No stream captures this subject: the server answers 503 (no responders).
        await pipe.publish("nobody.listens.here", b"{}", tag="lost")
        assert await pipe.flush(5)
    finally:
        await pipe.close()
    assert len(failures) == 1
    assert failures[0][0] == "lost" and "503" in failures[0][1]
    assert pipe.failed == 1


async def test_a_missing_acknowledgement_is_published_again(client: MeshClient) -> None:
    failures: list[tuple[Any, str]] = []
    pipe = await PubPipe(
        client.nc, ack_timeout=0.3, on_failure=lambda t, e: failures.append((t, e))
    ).open()
    rec = DeliveryRecord(event_id="e", target="t", attempt=1, outcome="delivered")
    try:
        # The first acknowledgement is lost (the inbox is not listening yet).
        assert pipe._sub is not None
        await pipe._sub.unsubscribe()
        await pipe.publish(client.subjects.delivery("t"), rec.to_bytes(), {"Nats-Msg-Id": rec.id})
        pipe._sub = await client.nc.subscribe(pipe._prefix + "*", cb=pipe._on_ack)
        await asyncio.sleep(0.4)
        assert await pipe.flush(5)
    finally:
        await pipe.close()
    assert failures == []
    msgs = await read_stream(client, client.names.sys, client.subjects.delivery("t"))
    assert [DeliveryRecord.from_bytes(m.data).id for m in msgs] == [rec.id]  # stored once


async def test_close_reports_what_was_never_acknowledged(client: MeshClient) -> None:
    failures: list[tuple[Any, str]] = []
    pipe = await PubPipe(client.nc, on_failure=lambda t, e: failures.append((t, e))).open()
    assert pipe._sub is not None
    await pipe._sub.unsubscribe()  # no acknowledgement will reach it
    await pipe.publish(client.subjects.delivery("t"), b"{}", tag="x")
    await pipe.close()
    assert failures == [("x", "not acknowledged before close")]


async def test_on_stored_runs_after_the_acknowledgement_and_never_on_failure(
    client: MeshClient,
) -> None:
    """What waits for a record (the egress's ack of its event) runs only once it is stored."""
    stored: list[str] = []
    failures: list[tuple[Any, str]] = []

    async def mark(tag: str) -> None:
        # Stored already: the stream holds the record when this runs.
        msgs = await read_stream(client, client.names.sys, client.subjects.delivery("t"))
        assert len(msgs) == 1
        stored.append(tag)

    pipe = await PubPipe(
        client.nc, attempts=1, on_failure=lambda t, e: failures.append((t, e))
    ).open()
    try:
        rec = DeliveryRecord(event_id="e", target="t", attempt=1, outcome="delivered")
        await pipe.publish(
            client.subjects.delivery("t"),
            rec.to_bytes(),
            {"Nats-Msg-Id": rec.id},
            "kept",
            lambda: mark("kept"),
        )
        await pipe.publish("nobody.listens.here", b"{}", None, "refused", lambda: mark("refused"))
        assert await pipe.flush(5)
    finally:
        await pipe.close()
    assert stored == ["kept"]
    assert [t for t, _ in failures] == ["refused"]
