"""Faults end to end: every published event is delivered at least once and stored exactly once.

The whole pipeline runs for real: a nats-server with file storage, the webhook
egress and the sink (in-process services), an aiohttp receiver. The receiver
flaps (500s, stalls past the timeout, connection resets) for the whole run, and
the broker is SIGKILLed and restarted twice mid-stream.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import RetryPolicy, Target, TargetKind
from mesh.storage import open_store
from services.egress.service import WebhookEgress
from services.sink.service import Sink
from tests.support import publish_reliably
from tests.support.receiver import Received, Receiver, Reply

pytestmark = pytest.mark.slow

N_EVENTS = 150


async def test_flapping_receiver_and_broker_kills(
    broker: EmbeddedBroker, settings: Settings
) -> None:
    rng = random.Random(20261128)
    answered_ok: set[str] = set()  # ids answered 200 at once (not stalled, not reset)

    def flap(req: Received) -> Reply | None:
        roll = rng.random()
        if roll < 0.25:
            return Reply(500)
        if roll < 0.32:
            return Reply(200, delay=1.5)  # past the 0.5 s timeout: counts as a failure
        if roll < 0.40:
            return Reply(reset=True)
        if req.webhook_id:
            answered_ok.add(req.webhook_id)
        return None  # the default: 200

    async with Receiver() as rx:
        rx.handler = flap
        async with MeshClient(settings, name="faults") as c:
            await c.init()
            await c.add_target(
                Target(
                    name="crm",
                    kind=TargetKind.WEBHOOK,
                    url=rx.url,
                    timeout_s=0.5,
                    circuit_open_s=0.5,
                    retry=RetryPolicy(base_s=0.05, max_delay_s=0.5, max_retries=100),
                )
            )
            await c.add_propagation("unidirectional", "shop", ["crm"])
            egress = WebhookEgress(settings)
            sink = Sink(settings)
            await egress.start()
            await sink.start()
            try:
                published: list[str] = []
                for chunk in range(3):
                    for i in range(chunk * N_EVENTS // 3, (chunk + 1) * N_EVENTS // 3):
                        published.append(await publish_reliably(c, f"fault-{i:04d}", {"i": i}))
                    if chunk < 2:
                        broker.kill()  # SIGKILL mid-stream: unacked work must come back
                        await asyncio.sleep(0.3)
                        broker.start()

                def delivered() -> set[str]:
                    return answered_ok

                deadline = time.monotonic() + 100
                while not set(published) <= delivered() and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                missing = set(published) - delivered()
                assert not missing, f"{len(missing)} events never delivered: {sorted(missing)[:5]}"

                store = await open_store(settings.db_url)
                try:
                    deadline = time.monotonic() + 30
                    while await store.count("events") < N_EVENTS and time.monotonic() < deadline:
                        await asyncio.sleep(0.25)
                    await asyncio.sleep(1.0)  # any duplicate write would land by now
                    assert await store.count("events") == N_EVENTS
                    ids = {e.id for e in await store.query_events(source="shop", limit=1000)}
                    assert ids == set(published)
                    assert await store.count("deliveries") >= N_EVENTS
                finally:
                    await store.close()
            finally:
                await egress.stop()
                await sink.stop()


async def test_bridge_sigkill_mid_stream_loses_nothing(
    broker: EmbeddedBroker, settings: Settings
) -> None:
    """A feed client acks half, the bridge process is SIGKILLed, a new bridge hands out the rest."""
    import subprocess
    import sys

    import aiohttp

    from mesh import tokens
    from tests.conftest import env_for

    s = settings.model_copy(update={"ack_wait_min_s": 2.0})
    env = {**env_for(s), "MESH_ACK_WAIT_MIN_S": "2"}
    async with MeshClient(s, name="bridge-faults") as c:
        await c.init()
        await c.add_target(Target(name="screens", kind=TargetKind.STREAM, timeout_s=2))
        await c.add_propagation("unidirectional", "news", ["screens"])
        ids = [await c.publish("news", "headline", {"n": i}) for i in range(20)]
        tok = tokens.issue(tokens.load_key(tokens.key_path(s)), "screens")
        url = f"ws://127.0.0.1:{s.bridge_port}/v1/stream"

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "mesh.cli", "serve", "bridge"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        async def connect(http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
            last: Exception | None = None
            for _ in range(100):
                try:
                    return await http.ws_connect(
                        url, params={"target": "screens"},
                        headers={"Authorization": f"Bearer {tok}"},
                    )  # fmt: skip
                except aiohttp.ClientError as exc:
                    last = exc
                    await asyncio.sleep(0.2)
            raise AssertionError(f"bridge never listened: {last}")

        acked: set[str] = set()
        proc = start()
        try:
            async with aiohttp.ClientSession() as http:
                ws = await connect(http)
                while len(acked) < 10:
                    doc = await ws.receive_json(timeout=10)
                    await ws.send_json({"ack": doc["seq"]})
                    acked.add(doc["id"])
                await asyncio.sleep(0.3)  # let the last acks reach the broker
                proc.kill()  # SIGKILL with frames in flight and unacked
                proc.wait()
                await ws.close()

                proc = start()
                ws = await connect(http)

                async def drained() -> bool:
                    info = await c.js.consumer_info(c.names.events, "deliver-screens")
                    return (info.num_pending, info.num_ack_pending) == (0, 0)

                # Read (and ack) until every id arrived and the consumer holds nothing:
                # redeliveries of frames whose acks died with the bridge come too.
                deadline = time.monotonic() + 40
                while not (set(ids) <= acked and await drained()):
                    assert time.monotonic() < deadline, f"missing {set(ids) - acked}"
                    try:
                        doc = await ws.receive_json(timeout=1)
                    except TimeoutError:
                        continue
                    await ws.send_json({"ack": doc["seq"]})
                    acked.add(doc["id"])
                await ws.close()
        finally:
            proc.kill()
            proc.wait()
        assert set(ids) <= acked, f"lost {len(set(ids) - acked)} of {len(ids)}"
