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


@pytest.mark.parametrize("lost", ["answered after timeout", "lost mid-stream"])
async def test_scan_rereads_what_a_timed_out_fetch_took(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch, lost: str
) -> None:
    want = await _publish(client, 300)
    real_fetch = scan_module._fetch
    calls = 0

    async def lossy_fetch(sub: Any, batch: int) -> list[Any]:
        nonlocal calls
        calls += 1
        msgs = await real_fetch(sub, batch)
        if calls == 2:
            if lost == "answered after timeout":
                # The server delivered this batch, the client had given up waiting.
                raise TimeoutError
            # The same, seen from the next fetch: this batch skips what a lost one took.
            msgs = await real_fetch(sub, batch)
        return msgs

    monkeypatch.setattr(scan_module, "_fetch", lossy_fetch)
    got = await _scan_ids(client, batch=50)
    assert calls > 2
    assert len(got) == 300, f"the scan ended early or repeated: {len(got)} of 300"
    assert set(got) == want


async def test_scan_from_a_sequence_after_a_loss_keeps_its_start(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _publish(client, 100)
    real_fetch = scan_module._fetch
    calls = 0

    async def lossy_fetch(sub: Any, batch: int) -> list[Any]:
        nonlocal calls
        calls += 1
        msgs = await real_fetch(sub, batch)
        if calls == 1:
            raise TimeoutError  # the very first batch lost: resume at the scan's own start
        return msgs

    monkeypatch.setattr(scan_module, "_fetch", lossy_fetch)
    seqs = [
        m.metadata.sequence.stream
        async for m in client.port.scan(
            client.names.events, [client.subjects.evt_all], start_seq=41, batch=20
        )
    ]
    assert seqs == list(range(41, 101))
