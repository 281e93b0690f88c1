"""The stream scan (replay, the DLQ tools, key rotation and backup read through it)
against a real nats-server: a fetch that timed out on the client's side may still have
been answered, and its messages are gone from an unacknowledged consumer. The scan must
notice (the consumer's delivery numbers jump) and read them again instead of ending
early ("replayed 512 event(s)" of 1,000, seen under load)."""

from __future__ import annotations

from typing import Any

import pytest

import mesh._nats.scan as scan_module
from mesh.client import MeshClient
from mesh.envelope import Event


async def _publish(client: MeshClient, n: int) -> set[str]:
    events = [Event(source="shop", type="order.created", data={"n": i}) for i in range(n)]
    assert await client.publish_many(events) == n
    return {e.id for e in events}


async def _scan_ids(client: MeshClient, batch: int) -> list[str]:
    return [
        (m.headers or {}).get("ce-id", "")
        async for m in client.port.scan(client.names.events, [client.subjects.evt_all], batch=batch)
    ]


async def test_scan_reads_every_message_in_order(client: MeshClient) -> None:
    want = await _publish(client, 300)
    got = await _scan_ids(client, batch=64)
    assert len(got) == 300
    assert set(got) == want


def lose_a_batch(monkeypatch: pytest.MonkeyPatch, at: int, how: str) -> list[int]:
    """Make the scan's ``at``-th fetch lose its batch, the way a fetch that timed out on
    the client's side does: the server delivered it, the scan never sees it. ``how``:
    "timeout" (that fetch raises) or "skip" (the next batch is handed out instead).
    Returns a one-item list counting the fetches."""
    real_fetch = scan_module._fetch
    calls = [0]

    async def lossy_fetch(sub: Any, batch: int) -> list[Any]:
        calls[0] += 1
        msgs = await real_fetch(sub, batch)
        if calls[0] == at:
            if how == "timeout":
                raise TimeoutError
            msgs = await real_fetch(sub, batch)
        return msgs

    monkeypatch.setattr(scan_module, "_fetch", lossy_fetch)
    return calls


@pytest.mark.parametrize("how", ["timeout", "skip"])
async def test_scan_rereads_what_a_timed_out_fetch_took(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    want = await _publish(client, 300)
    calls = lose_a_batch(monkeypatch, 2, how)
    got = await _scan_ids(client, batch=50)
    assert calls[0] > 2
    assert len(got) == 300, f"the scan ended early or repeated: {len(got)} of 300"
    assert set(got) == want


async def test_scan_from_a_sequence_after_a_loss_keeps_its_start(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _publish(client, 100)
    lose_a_batch(monkeypatch, 1, "timeout")  # the very first: resume at the scan's own start
    seqs = [
        m.metadata.sequence.stream
        async for m in client.port.scan(
            client.names.events, [client.subjects.evt_all], start_seq=41, batch=20
        )
    ]
    assert seqs == list(range(41, 101))
