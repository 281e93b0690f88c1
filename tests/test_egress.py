"""Webhook egress against real nats-server and real aiohttp receivers: delivery, signing,
retries, dead letters, 410, SSRF, request/reply, live registry changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from standardwebhooks import Webhook

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import Target, TargetKind, TargetStatus
from mesh.resilience import backoff_bounds
from services.egress.http.sender import HttpSender
from services.egress.service import WebhookEgress
from tests.support.receiver import (
    Receiver,
    Reply,
    add_webhook,
    dead_letters,
    delivery_records,
    eventually,
    fast_policy,
    new_secret,
)

FETCH_S = 0.5  # short idle fetches: a stop waits for the one in progress


@pytest.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


def verify_all(rx: Receiver, *secrets: str) -> None:
    """Every request verifies with the reference library, under each given secret."""
    assert rx.requests
    for secret in secrets:
        wh = Webhook(secret)
        for req in rx.requests:
            wh.verify(req.body, req.headers)


async def test_delivers_signed_standard_webhooks(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    secret = await add_webhook(client, "hook", rx.url)
    ids = [await client.publish("shop", "order.created", {"n": i}) for i in range(3)]
    await rx.wait_for(3)
    verify_all(rx, secret)
    assert rx.ids() == ids or set(rx.ids()) == set(ids)
    doc = rx.requests[0].json()
    assert set(doc) == {"type", "timestamp", "data"}
    assert doc["type"] == "order.created"
    assert doc["timestamp"].endswith("Z")
    assert sorted(r.json()["data"]["n"] for r in rx.requests) == [0, 1, 2]
    assert rx.requests[0].headers["content-type"] == "application/json"
    records = await eventually(lambda: _delivered(client, "hook", 3))
    assert {r.event_id for r in records} == set(ids)
    assert all(r.attempt == 1 and r.status_code == 200 for r in records)
    stats = egress.stats()
    assert stats["circuits"] == {"hook": "closed"}
    assert stats["delivered"] == 3


async def _delivered(client: MeshClient, target: str, n: int) -> list | None:
    recs = [r for r in await delivery_records(client, target) if r.outcome == "delivered"]
    return recs if len(recs) >= n else None


async def test_rotation_signs_with_both_secrets(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    old = await add_webhook(client, "hook", rx.url)
    await client.publish("shop", "a.b", {"before": True})
    await rx.wait_for(1)
    new = await client.registry.rotate_secret("hook", grace=timedelta(hours=1))
    # The egress sees the rotation through its registry watch: no restart.
    await eventually(
        lambda: (
            len(egress.workers["hook"].client.registry.secrets_for(egress.workers["hook"].target))
            == 2
        )
    )
    await client.publish("shop", "a.b", {"after": True})
    await rx.wait_for(2)
    after = rx.requests[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(after.body, after.headers)
    Webhook(old).verify(after.body, after.headers)
    verify_all(rx, old)


async def test_cloudevents_binary_mode(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    secret = await add_webhook(client, "hook", rx.url, format="cloudevents")
    event_id = await client.publish("shop", "order.paid", {"total": 12.5}, subject="o-1")
    (req,) = await rx.wait_for(1)
    verify_all(rx, secret)
    h = req.headers
    assert h["ce-id"] == event_id == h["webhook-id"]
    assert h["ce-source"] == "shop"
    assert h["ce-type"] == "order.paid"
    assert h["ce-specversion"] == "1.0"
    assert h["ce-subject"] == "o-1"
    assert h["content-type"] == "application/json"
    assert req.json() == {"total": 12.5}


async def test_retries_follow_the_policy(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    policy = fast_policy(base_s=0.1, multiplier=2.0, max_delay_s=1.0, max_retries=5)
    secret = await add_webhook(client, "hook", rx.url, retry=policy)
    rx.fail_first(3, status=503)
    event_id = await client.publish("shop", "a.b", {"x": 1})
    await rx.wait_for(4)
    await asyncio.sleep(0.3)
    assert len(rx.requests) == 4, "delivered on attempt k+1 and not again"
    assert [r.status for r in rx.requests] == [503, 503, 503, 200]
    assert rx.ids() == [event_id] * 4
    verify_all(rx, secret)
    for n, gap in enumerate(rx.gaps(), start=1):
        low, high = backoff_bounds(policy, n)
        # The broker holds each nak'ed redelivery for the delay: never early.
        assert gap >= low - 0.01, (n, gap, low)
        assert gap <= high + 0.75, (n, gap, high)  # scheduling slack upward
    records = await eventually(lambda: _delivered(client, "hook", 1))
    assert records[0].attempt == 4
    all_records = await delivery_records(client, "hook")
    assert [r.outcome for r in all_records] == ["retry", "retry", "retry", "delivered"]
    assert [r.attempt for r in all_records] == [1, 2, 3, 4]
    assert all_records[0].status_code == 503


async def test_retry_after_is_honoured(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    await add_webhook(client, "hook", rx.url)
    rx.script(Reply(429, headers={"Retry-After": "1"}))
    await client.publish("shop", "a.b", {})
    await rx.wait_for(2)
    (gap,) = rx.gaps()
    assert gap >= 1.0 - 0.01  # the policy alone would have waited 0.05 s
    assert [r.status for r in rx.requests] == [429, 200]


async def test_connection_reset_and_timeout_are_retried(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    await add_webhook(client, "hook", rx.url, timeout_s=0.3)
    rx.script(Reply(reset=True), Reply(delay=1.0))
    await client.publish("shop", "a.b", {})
    await eventually(lambda: any(r.status == 200 for r in rx.requests), timeout=10)
    records = await eventually(lambda: _delivered(client, "hook", 1))
    assert records[0].attempt == 3
    errors = [r.error for r in await delivery_records(client, "hook") if r.outcome == "retry"]
    assert any("connection error" in (e or "") for e in errors), errors
    assert any("timeout" in (e or "") for e in errors), errors


async def test_dead_letter_after_the_last_attempt(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    await add_webhook(client, "hook", rx.url, retry=fast_policy(max_retries=2))
    rx.set_default(Reply(500, body=b"database on fire"))
    event_id = await client.publish("shop", "a.b", {"x": 1})
    dead = await eventually(lambda: dead_letters(client, "hook"))
    assert len(rx.requests) == 3  # 1 attempt + 2 retries
    (dl,) = dead
    assert dl.event_id == event_id
    assert dl.attempts == 3
    assert "HTTP 500" in dl.error and "database on fire" in dl.error
    await asyncio.sleep(0.3)
    assert len(rx.requests) == 3, "acked after dead-lettering: no further attempt"
    outcomes = [r.outcome for r in await delivery_records(client, "hook")]
    assert outcomes == ["retry", "retry", "dead"]


async def test_undecodable_event_is_dead_lettered(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    await add_webhook(client, "hook", rx.url)
    headers = {
        "Nats-Msg-Id": "bad-1",
        "ce-specversion": "1.0",
        "ce-id": "bad-1",
        "ce-source": "shop",
        "ce-type": "a.b",
        "ce-datacontenttype": "application/msgpack",
    }
    await client.js.publish("mesh.evt.shop.a.b", b"\xc1\xc1\xc1 not msgpack", headers=headers)
    good = await client.publish("shop", "a.b", {"ok": True})
    dead = await eventually(lambda: dead_letters(client, "hook"))
    await rx.wait_for(1)
    assert rx.ids() == [good]
    assert dead[0].event_id == "bad-1"
    assert dead[0].error.startswith("undecodable")


async def test_410_disables_the_target(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    await add_webhook(client, "hook", rx.url)
    rx.script(Reply(410))
    event_id = await client.publish("shop", "a.b", {})
    dead = await eventually(lambda: dead_letters(client, "hook"))
    assert dead[0].event_id == event_id
    assert "410" in dead[0].error
    target = await client.registry.get_target("hook")
    assert target.status == TargetStatus.DISABLED
    assert "410" in (target.status_reason or "")
    await eventually(lambda: "hook" not in egress.workers)
    await client.publish("shop", "a.b", {"later": True})
    await asyncio.sleep(0.5)
    assert len(rx.requests) == 1, "a disabled target gets nothing"
    # Enabling it again resumes delivery of what queued up meanwhile.
    await client.registry.set_status("hook", TargetStatus.ACTIVE, None)
    await rx.wait_for(2)
    assert rx.requests[1].json()["data"] == {"later": True}


async def test_private_destination_refused_unless_allowed(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    await add_webhook(client, "hook", rx.url)
    strict = WebhookEgress(
        settings.model_copy(update={"allow_private_targets": False}), fetch_expires_s=FETCH_S
    )
    await strict.start()
    try:
        event_id = await client.publish("shop", "a.b", {})
        dead = await eventually(lambda: dead_letters(client, "hook"))
        assert dead[0].event_id == event_id
        assert "private/loopback/link-local" in dead[0].error
        assert dead[0].attempts == 1, "refused once, not retried"
        assert rx.requests == []
    finally:
        await strict.stop()
    allowing = WebhookEgress(
        settings, fetch_expires_s=FETCH_S
    )  # the fixture's settings allow private targets
    await allowing.start()
    try:
        second = await client.publish("shop", "a.b", {})
        await rx.wait_for(1)
        assert rx.ids() == [second]
    finally:
        await allowing.stop()


async def test_targets_follow_the_registry_live(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    assert egress.workers == {}
    await add_webhook(client, "late", rx.url)
    await eventually(lambda: "late" in egress.workers)
    await client.publish("shop", "a.b", {})
    await rx.wait_for(1)
    async with Receiver() as other:
        target = await client.registry.get_target("late")
        target.url = other.url
        await client.registry.put_target(target)
        await eventually(lambda: egress.workers["late"].target.url == other.url)
        await client.publish("shop", "a.b", {})
        await other.wait_for(1)
    await client.remove_target("late")
    await eventually(lambda: "late" not in egress.workers)
    assert "late" not in egress.stats()["circuits"]


async def test_request_reply_is_a_signed_synchronous_post(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    await client.add_target(Target(name="app", kind=TargetKind.NATS))
    secret = await add_webhook(client, "hook", rx.url, source="other")
    await client.add_propagation("bidirectional", "app", ["hook"])
    await eventually(lambda: "hook" in egress.workers and egress.workers["hook"].rpc.sub)
    rx.script(Reply(201, headers={"content-type": "application/json"}, body=b'{"quote": 42}'))
    reply = await client.request("app", "hook", "price.get", {"sku": "x"}, timeout=5)
    assert reply.status == 201
    assert reply.data == {"quote": 42}
    (req,) = rx.requests
    Webhook(secret).verify(req.body, req.headers)
    assert req.json()["data"] == {"sku": "x"}
    assert req.json()["type"] == "price.get"
    rx.script(Reply(503, body=b"busy"))
    reply = await client.request("app", "hook", "price.get", {}, timeout=5)
    assert reply.status == 503


async def test_resolver_refuses_private_answers_at_connect_time(rx: Receiver) -> None:
    """A host that passed the destination check but resolves privately when connecting
    (DNS rebinding) is refused by the session's resolver."""
    sender = HttpSender(allow_private=False)
    url = f"http://localhost:{rx.port}/hook"
    # Pretend the check already passed (as with a public answer a moment earlier).
    sender.guard._cache[("http", "localhost", rx.port)] = (time.monotonic() + 60, None)
    try:
        result = await sender.post(url, b"{}", {"content-type": "application/json"}, 2.0)
    finally:
        await sender.close()
    assert result.refused
    assert "private/loopback/link-local" in (result.error or "")
    assert rx.requests == []


async def test_unusable_secret_parks_the_target_without_losing_events(
    client: MeshClient, rx: Receiver, egress: WebhookEgress
) -> None:
    await add_webhook(client, "hook", rx.url, secret="whsec_a")  # not valid base64
    event_id = await client.publish("shop", "a.b", {"kept": True})
    target = await eventually(lambda: _disabled(client, "hook"))
    assert "cannot sign" in (target.status_reason or "")
    assert rx.requests == []
    assert await dead_letters(client, "hook") == []
    good = new_secret()
    target.secret_enc = client.registry._seal(good)
    target.status = TargetStatus.ACTIVE
    target.status_reason = None
    await client.registry.put_target(target)
    (req,) = await rx.wait_for(1)
    assert req.webhook_id == event_id
    Webhook(good).verify(req.body, req.headers)


async def _disabled(client: MeshClient, name: str) -> Target | None:
    target = await client.registry.get_target(name)
    return target if target.status == TargetStatus.DISABLED else None
