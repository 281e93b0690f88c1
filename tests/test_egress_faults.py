"""Webhook egress under failure: circuit breaker (one and two instances), ordering through
failures, rate limits, graceful drain, SIGKILL and broker restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.config import Settings
from services.egress.service import WebhookEgress
from tests.conftest import env_for
from tests.support.receiver import (
    Received,
    Receiver,
    Reply,
    add_webhook,
    delivery_records,
    eventually,
    fast_policy,
)

FETCH_S = 0.5


@pytest.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def start_egress(settings: Settings, **kw: object) -> WebhookEgress:
    svc = WebhookEgress(settings, fetch_expires_s=FETCH_S, **kw)  # type: ignore[arg-type]
    await svc.start()
    return svc


def circuit_gauge(target: str) -> float | None:
    return REGISTRY.get_sample_value("mesh_circuit_state", {"target": target})


# Circuit breaker ------------------------------------------------------------------


async def test_circuit_opens_probes_once_and_closes(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    open_s = 1.5
    await add_webhook(
        client,
        "hook",
        rx.url,
        max_in_flight=8,
        circuit_threshold=3,
        circuit_open_s=open_s,
        retry=fast_policy(max_retries=50, max_delay_s=0.2),
    )
    rx.set_default(Reply(503))
    egress = await start_egress(settings)
    try:
        ids = set()
        for i in range(10):
            ids.add(await client.publish("shop", "a.b", {"i": i}))
        await eventually(lambda: egress.stats()["circuits"]["hook"] == "open", timeout=10)
        assert circuit_gauge("hook") == 2
        info = await client.js.consumer_info(client.names.events, "deliver-hook")
        assert info.paused, "an open circuit pauses the target's consumer on the server"
        await asyncio.sleep(0.5)  # requests already on the wire land
        before = len(rx.requests)
        last_before = rx.requests[-1].at

        # First probe after the open period: alone, and it fails -> open again.
        probe1 = (await rx.wait_for(before + 1, timeout=5))[before]
        assert probe1.at - last_before >= open_s - 0.1, "no request while the circuit is open"
        await asyncio.sleep(0.5)
        assert len(rx.requests) == before + 1, "exactly one probe in half-open"
        await eventually(lambda: egress.stats()["circuits"]["hook"] == "open")

        # Second probe succeeds -> closed -> the backlog flows.
        rx.set_default(Reply(200))
        probe2 = (await rx.wait_for(before + 2, timeout=5))[before + 1]
        assert probe2.at - probe1.at >= open_s - 0.1
        await rx.wait_for(10, unique=True, where=lambda r: r.status == 200, timeout=10)
        assert {r.webhook_id for r in rx.requests if r.status == 200} == ids
        assert egress.stats()["circuits"]["hook"] == "closed"
        assert circuit_gauge("hook") == 0
        info = await client.js.consumer_info(client.names.events, "deliver-hook")
        assert not info.paused

        # While open, events spent no attempts: each event's recorded attempts are 1..k
        # with k its number of requests (none was charged without being sent).
        records = await eventually(lambda: _records_for_all(client, ids))
        for event_id in ids:
            attempts = sorted(r.attempt for r in records if r.event_id == event_id)
            assert attempts == list(range(1, len(rx.for_id(event_id)) + 1)), event_id
    finally:
        await egress.stop()


async def _records_for_all(client: MeshClient, ids: set[str]) -> list | None:
    records = await delivery_records(client, "hook")
    delivered = {r.event_id for r in records if r.outcome == "delivered"}
    return records if delivered >= ids else None


async def test_two_instances_send_exactly_one_probe(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    open_s = 1.5
    await add_webhook(
        client,
        "hook",
        rx.url,
        max_in_flight=4,
        circuit_threshold=2,
        circuit_open_s=open_s,
        retry=fast_policy(max_retries=50, max_delay_s=0.2),
    )
    rx.set_default(Reply(503))
    a = await start_egress(settings)
    b = await start_egress(settings)
    try:
        await eventually(lambda: a.instance_count() == 2 and b.instance_count() == 2)
        ids = {await client.publish("shop", "a.b", {"i": i}) for i in range(12)}
        await eventually(
            lambda: a.stats()["circuits"]["hook"] == b.stats()["circuits"]["hook"] == "open",
            timeout=10,
        )
        await asyncio.sleep(0.5)  # requests already on the wire land
        before = len(rx.requests)
        last_before = rx.requests[-1].at
        # Two half-open windows, each with exactly one probe from one of the two instances.
        probes = (await rx.wait_for(before + 2, timeout=8))[before : before + 2]
        await asyncio.sleep(0.5)
        assert len(rx.requests) == before + 2, [round(r.at - probes[0].at, 2) for r in rx.requests]
        assert probes[0].at - last_before >= open_s - 0.1, "no request while open"
        assert probes[1].at - probes[0].at >= open_s - 0.1
        rx.set_default(Reply(200))
        await rx.wait_for(12, unique=True, where=lambda r: r.status == 200, timeout=15)
        assert {r.webhook_id for r in rx.requests if r.status == 200} == ids
        await eventually(
            lambda: a.stats()["circuits"]["hook"] == b.stats()["circuits"]["hook"] == "closed"
        )
        # The receiver counts a request when it arrives; an instance counts it once settled.
        await eventually(lambda: a.stats()["delivered"] + b.stats()["delivered"] >= 12)
    finally:
        await asyncio.gather(a.stop(), b.stop())


# Ordering and rate ---------------------------------------------------------------


async def test_ordered_target_keeps_publish_order_through_failures(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    await add_webhook(client, "hook", rx.url, ordered=True, retry=fast_policy(max_retries=10))
    ids = [await client.publish("shop", "a.b", {"i": i}) for i in range(8)]
    index = {event_id: i for i, event_id in enumerate(ids)}
    failures = {ids[1]: 2, ids[4]: 1, ids[6]: 3}  # event -> attempts that fail
    seen: dict[str, int] = {}

    def handler(req: Received) -> Reply | None:
        n = seen.get(req.webhook_id or "", 0) + 1
        seen[req.webhook_id or ""] = n
        return Reply(500) if n <= failures.get(req.webhook_id or "", 0) else Reply(200)

    rx.handler = handler
    egress = await start_egress(settings)
    try:
        await rx.wait_for(8, unique=True, where=lambda r: r.status == 200, timeout=20)
        order = [index[r.webhook_id] for r in rx.requests if r.webhook_id]
        assert order == sorted(order), f"requests out of publish order: {order}"
        assert len(rx.requests) == 8 + sum(failures.values())
        assert rx.max_in_flight == 1
    finally:
        await egress.stop()


@pytest.mark.slow
async def test_rate_limit_holds(settings: Settings, client: MeshClient, rx: Receiver) -> None:
    rate = 20.0
    await add_webhook(client, "hook", rx.url, rate=rate, max_in_flight=32)
    events = [client.build("shop", "a.b", {"i": i}) for i in range(60)]
    await client.publish_many(events)
    egress = await start_egress(settings)
    try:
        reqs = await rx.wait_for(60, timeout=30)
        observed = (len(reqs) - 1) / (reqs[-1].at - reqs[0].at)
        assert abs(observed - rate) <= rate * 0.10, f"observed {observed:.2f}/s for {rate}/s"
        # No burst either: no second of the run carries much more than the rate.
        start = reqs[0].at
        for r in reqs:
            window = [x for x in reqs if r.at <= x.at < r.at + 1.0]
            assert len(window) <= rate * 1.1 + 2, (round(r.at - start, 2), len(window))
    finally:
        await egress.stop()


async def test_a_rate_limited_worker_holds_no_more_than_its_rate_allows(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    # 10/s: what it holds waits for tokens, so it holds max(2, 10/s * 0.1 s) = 2 at most,
    # leaving the rest of a burst to other instances (not 32 in flight plus a batch).
    await add_webhook(client, "hook", rx.url, rate=10.0, max_in_flight=32)
    await client.publish_many([client.build("shop", "a.b", {"i": i}) for i in range(12)])
    egress = await start_egress(settings)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            worker = egress.workers.get("hook")
            if worker is not None:
                peak = max(peak, worker.held)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        await rx.wait_for(12, unique=True, timeout=20)
        assert 1 <= peak <= 2, peak
    finally:
        watcher.cancel()
        await egress.stop()


@pytest.mark.slow
async def test_rate_limit_holds_across_two_instances(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    rate = 20.0
    await add_webhook(client, "hook", rx.url, rate=rate, max_in_flight=32)
    a = await start_egress(settings)
    b = await start_egress(settings)
    try:
        # Each instance takes half the target's rate once they have seen each other.
        await eventually(lambda: a.instance_count() == b.instance_count() == 2)
        assert a.stats()["targets"]["hook"]["rate_share"] == rate / 2
        await client.publish_many([client.build("shop", "a.b", {"i": i}) for i in range(60)])
        reqs = await rx.wait_for(60, timeout=30)
        observed = (len(reqs) - 1) / (reqs[-1].at - reqs[0].at)
        assert abs(observed - rate) <= rate * 0.10, f"observed {observed:.2f}/s for {rate}/s"
        assert a.stats()["delivered"] > 0 and b.stats()["delivered"] > 0, "both did work"
        # One stops (its last heartbeat says so): the other takes the whole rate again.
        await b.stop()
        await eventually(lambda: a.stats()["targets"]["hook"]["rate_share"] == rate)
    finally:
        await asyncio.gather(a.stop(), b.stop())


# Stopping and crashing ----------------------------------------------------------


async def test_drain_finishes_requests_on_the_wire_and_hands_back_the_rest(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    await add_webhook(client, "hook", rx.url, max_in_flight=2)
    rx.set_default(Reply(delay=1.0))
    ids = [await client.publish("shop", "a.b", {"i": i}) for i in range(6)]
    egress = await start_egress(settings)
    await rx.wait_for(2)
    assert egress.stats()["in_flight"] >= 1
    await egress.drain(timeout=5.0)
    await egress.close()
    assert all(r.status == 200 for r in rx.requests), "requests on the wire were not cut off"
    assert len(rx.requests) < 6, "stopped pulling"
    rx.set_default(Reply())
    second = await start_egress(settings)
    try:
        # The rest comes back at once (nak-ed or never fetched), not after the ack wait.
        await rx.wait_for(6, unique=True, timeout=8)
        assert sorted(rx.ids()) == sorted(ids), "nothing sent twice: the drained ones were acked"
    finally:
        await second.stop()


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_nothing(
    settings: Settings, client: MeshClient, rx: Receiver, tmp_path: Path
) -> None:
    # What the dead process held comes back after the consumer's ack wait: a short one
    # (9 s: 2 x timeout + 5) so that even a message that misses one round has time for more.
    quick = settings.model_copy(update={"ack_wait_min_s": 5.0})
    async with MeshClient(quick, name="test-quick") as setup:
        await add_webhook(setup, "hook", rx.url, max_in_flight=8, timeout_s=2.0)
    rx.set_default(Reply(delay=0.02))
    total = 150
    events = [client.build("shop", "a.b", {"i": i}) for i in range(total)]
    await client.publish_many(events)
    env = {**env_for(quick), "MESH_ACK_WAIT_MIN_S": "5"}
    mesh = os.path.join(os.path.dirname(sys.executable), "mesh")
    log = open(tmp_path / "egress.log", "ab")  # noqa: SIM115, ASYNC230 - tiny, closed in finally

    async def spawn() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            mesh, "serve", "webhook-egress", env=env, stdout=log, stderr=log
        )

    proc = await spawn()
    try:
        await rx.wait_for(30, timeout=30)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert len(rx.unique_ids()) < total, "killed mid-stream"
        proc = await spawn()
        try:
            await rx.wait_for(total, unique=True, timeout=60)
        except AssertionError:
            ci = await client.js.consumer_info(client.names.events, "deliver-hook")
            missing = {e.id for e in events} - rx.unique_ids()
            raise AssertionError(
                f"{len(missing)} never arrived: {sorted(missing)[:5]}; consumer: pending "
                f"{ci.num_pending}, unacked {ci.num_ack_pending}, redelivered "
                f"{ci.num_redelivered}, waiting pulls {ci.num_waiting}"
            ) from None
        assert rx.unique_ids() == {e.id for e in events}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0, "SIGTERM drains and exits 0"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


@pytest.mark.slow
async def test_broker_restart_mid_stream(
    broker: EmbeddedBroker, settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    await add_webhook(client, "hook", rx.url)
    egress = await start_egress(settings)
    try:
        first = [await client.publish("shop", "a.b", {"i": i}) for i in range(5)]
        await rx.wait_for(5, unique=True)
        await broker.astop()
        await asyncio.sleep(0.5)
        await broker.astart()
        await eventually(lambda: client.nc.is_connected and egress.client.nc.is_connected)
        later = []
        for i in range(5):
            later.append(await _publish_retrying(client, i))
        # A message the server handed to a pull request made just before the restart
        # can be stranded in the replaced subscription: it returns after the ack wait.
        info = await client.js.consumer_info(client.names.events, "deliver-hook")
        await rx.wait_for(10, unique=True, timeout=float(info.config.ack_wait or 30) + 20)
        assert rx.unique_ids() == set(first) | set(later)
    finally:
        await egress.stop()


async def _publish_retrying(client: MeshClient, i: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await client.publish("shop", "a.b", {"later": i}, timeout=2)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_requests_past_the_drain_timeout_are_handed_back(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    await add_webhook(client, "hook", rx.url, timeout_s=10.0)
    rx.script(Reply(delay=3.0))
    event_id = await client.publish("shop", "a.b", {})
    egress = await start_egress(settings)
    await rx.wait_for(1)
    await egress.drain(timeout=0.5)
    await egress.close()
    second = await start_egress(settings)
    try:
        # Nak-ed when cancelled: back within seconds, not after the 30 s ack wait.
        await rx.wait_for(2, timeout=8)
        assert rx.ids() == [event_id, event_id]
    finally:
        await second.stop()


async def test_an_open_circuit_does_not_hold_up_other_targets(
    settings: Settings, client: MeshClient, rx: Receiver
) -> None:
    async with Receiver(default=Reply(503)) as bad:
        await add_webhook(
            client, "broken", bad.url, circuit_threshold=2, retry=fast_policy(max_retries=50)
        )
        await add_webhook(client, "fine", rx.url)
        egress = await start_egress(settings)
        try:
            ids = {await client.publish("shop", "a.b", {"i": i}) for i in range(10)}
            await eventually(lambda: egress.stats()["circuits"]["broken"] == "open")
            await rx.wait_for(10, unique=True, timeout=10)
            assert rx.unique_ids() == ids
            assert egress.stats()["circuits"] == {"broken": "open", "fine": "closed"}
        finally:
            await egress.stop()
