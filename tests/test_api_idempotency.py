"""Idempotency-Key on publishes: one stored event and one answer, whatever the retries.

50 concurrent identical requests, then the same request after a broker restart
(the answers live in a KV bucket, not in the API's memory), then a restarted API
instance; a reused key with another body is refused; a batch keeps its ids.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.config import Settings
from tests.support import eventually
from tests.support.api import Http, api_running, make_key


async def stored_ids(client: MeshClient) -> list[str]:
    """The ce-id of every message in MESH_EVENTS."""
    info = await client.js.stream_info(client.names.events)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await client.js.get_msg(client.names.events, seq)
        ids.append((msg.headers or {}).get("ce-id", ""))
    return ids


@pytest.mark.slow
async def test_fifty_concurrent_then_after_broker_restart_one_event(
    settings: Settings, client: MeshClient, broker: EmbeddedBroker
) -> None:
    _, key = await make_key(client, "publish")
    doc = {"source": "shop", "type": "order.created", "data": {"n": 1}}
    headers = {"Idempotency-Key": "order-1"}
    async with api_running(settings) as api, Http(api.url, key) as http:
        answers = await asyncio.gather(
            *(http.call("POST", "/v1/events", doc, headers=headers) for _ in range(50))
        )
        assert {status for status, _, _ in answers} == {202}, answers
        ids = {body["id"] for _, _, body in answers}
        assert len(ids) == 1
        [event_id] = ids
        replayed = sum(1 for _, h, _ in answers if h.get("Idempotent-Replayed") == "true")
        assert replayed == 49
        assert await stored_ids(client) == [event_id]

        await broker.astop()
        await broker.astart()
        await eventually(lambda: api.client.nc.is_connected, what="the API reconnected")

        async def after_restart() -> tuple[int, dict[str, str], object] | None:
            got = await http.call("POST", "/v1/events", doc, headers=headers)
            return got if got[0] == 202 else None

        status, h, body = await eventually(after_restart, timeout=20, what="an answer")
        assert body == {"id": event_id} and h["Idempotent-Replayed"] == "true"

    # a new API instance (another process, say) answers the same
    async with api_running(settings) as api2, Http(api2.url, key) as http:
        status, h, body = await http.call("POST", "/v1/events", doc, headers=headers)
        assert (status, body) == (202, {"id": event_id})
        # the same key with another body is refused; another key publishes anew
        status, _, problem = await http.call(
            "POST", "/v1/events", {**doc, "data": {"n": 2}}, headers=headers
        )
        assert status == 409 and problem["type"] == "urn:mesh:problem:idempotency-key-reused"
        status, _, other = await http.call(
            "POST", "/v1/events", doc, headers={"Idempotency-Key": "order-2"}
        )
        assert status == 202 and other["id"] != event_id
    assert sorted(await stored_ids(client)) == sorted([event_id, other["id"]])


async def test_batch_with_a_key_and_keys_are_per_api_key(
    settings: Settings, client: MeshClient
) -> None:
    _, key_a = await make_key(client, "publish", name="a")
    _, key_b = await make_key(client, "publish", name="b")
    batch = {"events": [{"source": "shop", "type": "t", "data": i} for i in range(20)]}
    headers = {"Idempotency-Key": "batch-1"}
    async with api_running(settings) as api, Http(api.url) as http:
        first = await http.call("POST", "/v1/events:batch", batch, key=key_a, headers=headers)
        again = await http.call("POST", "/v1/events:batch", batch, key=key_a, headers=headers)
        other = await http.call("POST", "/v1/events:batch", batch, key=key_b, headers=headers)
        bad = await http.call(
            "POST", "/v1/events:batch", batch, key=key_a, headers={"Idempotency-Key": "k" * 300}
        )
    assert first[0] == again[0] == other[0] == 202
    assert first[2] == again[2] and len(first[2]["ids"]) == 20
    assert set(first[2]["ids"]).isdisjoint(other[2]["ids"])
    assert bad[0] == 400 and "Traceback" not in json.dumps(bad[2])
    assert sorted(await stored_ids(client)) == sorted(first[2]["ids"] + other[2]["ids"])
    # the answers are kept 24 hours by the bucket itself
    info = await client.js.stream_info(f"KV_{client.names.idempotency}")
    assert info.config.max_age == 24 * 3600


async def test_a_claim_left_by_a_crashed_request_is_taken_over(
    settings: Settings, client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from services.api import idempotency as idem

    monkeypatch.setattr(idem, "WAIT_S", 1.0)

    key_id, key = await make_key(client, "publish")
    body = json.dumps({"source": "shop", "type": "order.created"}).encode()
    async with api_running(settings) as api, Http(api.url, key) as http:
        store = api.idempotency
        entry = store.entry_key(key_id, "k1")
        fp = idem.fingerprint("POST", "/v1/events", body)
        stale = idem.Entry(
            state="pending", fingerprint=fp, claimed_at=time.time() - idem.LEASE_S - 1
        )
        await store.kv.create(entry, stale.model_dump_json().encode())
        status, _, answer = await http.call(
            "POST", "/v1/events", data=body, headers={"Idempotency-Key": "k1"}
        )
        # the crashed request would have published the same derived id: stored once
        assert (status, answer) == (202, {"id": idem.derived_id(key_id, "k1")})
        fresh = idem.Entry(state="pending", fingerprint=fp, claimed_at=time.time())
        await store.kv.create(store.entry_key(key_id, "k2"), fresh.model_dump_json().encode())
        started = time.monotonic()
        status, _, problem = await http.call(
            "POST", "/v1/events", data=body, headers={"Idempotency-Key": "k2"}
        )
        assert status == 409 and problem["type"] == "urn:mesh:problem:idempotency-in-progress"
        assert time.monotonic() - started >= idem.WAIT_S - 1
    assert await stored_ids(client) == [idem.derived_id(key_id, "k1")]
