"""Steady publishing and consuming against a cluster, recording what was acknowledged.

Each publisher is a ``MeshClient`` pinned to one node (so a partition strands exactly the
publishers of the cut-off side) that publishes ``<name>-<n>`` ids at a steady pace and
retries one id, with the same id, until it is acknowledged: the id is the dedupe key, so a
retry after a lost ack is stored once. The consumer reads a ``nats`` target's feed through
every node's URL and acks each event after recording it; a feed that breaks (a registry
read or an ack lost in a partition) is opened again, as a service would. The persistence
sink runs in-process (SQLite) against every node's URL and is started again after a
failed start, as its systemd unit would restart it (``Restart=on-failure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import Target, TargetKind

if TYPE_CHECKING:
    from services.sink import Sink

SOURCE = "shop"
TARGET = "audit"


@dataclass
class Progress:
    """What a workload has seen so far; the checker reads ``acked`` and ``received``."""

    acked: dict[str, list[str]] = field(default_factory=dict)
    ack_times: dict[str, list[float]] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)
    received_times: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def acked_between(self, pub: str, start: float, end: float) -> int:
        return sum(1 for t in self.ack_times[pub] if start <= t < end)

    def received_since(self, start: float) -> int:
        return sum(1 for t in self.received_times if t >= start)

    def all_acked(self) -> set[str]:
        return {eid for ids in self.acked.values() for eid in ids}


class Workload:
    """Publishers (one per URL) and one consumer; ``start``, then ``stop_publishing``,
    ``wait_consumed`` and ``close``."""

    def __init__(
        self,
        settings: Settings,
        publisher_urls: dict[str, str],
        *,
        interval: float = 0.05,
        sink_db: Path | None = None,
    ) -> None:
        self.settings = settings
        self.sink_db = sink_db
        self._sink: Sink | None = None
        self.publisher_urls = publisher_urls
        self.interval = interval
        self.progress = Progress()
        self._stop_publishing = asyncio.Event()
        self._stop_consuming = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[MeshClient] = []

    async def setup(self, timeout: float = 60.0) -> None:
        """Streams (R3 from the settings), the target and its propagation.

        Retried as a whole: on a cluster that has just started, a bucket or stream create
        that timed out may still be applying, so the next look can find it missing and the
        next create refused (``open_bucket`` then raises BucketNotFoundError).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with MeshClient(self.settings, name="faults-setup") as c:
                    await c.init()
                    await c.add_target(Target(name=TARGET, kind=TargetKind.NATS, timeout_s=5))
                    await c.add_propagation("unidirectional", SOURCE, [TARGET])
                return
            except Exception as exc:
                self.progress.errors[f"setup {type(exc).__name__}: {str(exc)[:120]}"] += 1
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def start(self) -> None:
        for pub, url in self.publisher_urls.items():
            client = await self._client(f"pub-{pub}", url)
            self.progress.acked[pub] = []
            self.progress.ack_times[pub] = []
            self._tasks.append(asyncio.create_task(self._publish(client, pub)))
        consumer = await self._client("consumer", self.settings.nats_url or "")
        self._tasks.append(asyncio.create_task(self._consume(consumer)))
        if self.sink_db is not None:
            self._tasks.append(asyncio.create_task(self._run_sink(self.sink_db)))

    async def _run_sink(self, db: Path) -> None:
        """The sink, started again after a failed start (a service's unit restarts it)."""
        from services.sink import Sink

        settings = self.settings.model_copy(update={"db_url": f"sqlite:///{db}"})
        while self._sink is None:
            sink = Sink(settings)
            try:
                await sink.start()
                self._sink = sink
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await sink.stop()
                raise
            except Exception as exc:
                self.progress.errors[f"sink start {type(exc).__name__}"] += 1
                with contextlib.suppress(Exception):
                    await sink.stop()
                await asyncio.sleep(0.5)

    def sink_ids(self) -> list[str]:
        """The ids in the sink's ``events`` table (none before the table exists)."""
        if self.sink_db is None or not self.sink_db.exists():
            return []
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.sink_db}?mode=ro", uri=True, timeout=5)
            ) as db:
                return [r[0] for r in db.execute("SELECT id FROM events")]
        except sqlite3.Error:
            return []

    async def wait_sunk(self, timeout: float) -> set[str]:
        """Wait until the sink's table has every acknowledged id; return those missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = self.progress.all_acked() - set(await asyncio.to_thread(self.sink_ids))
            if not missing or time.monotonic() > deadline:
                return missing
            await asyncio.sleep(0.3)

    async def _client(self, name: str, url: str) -> MeshClient:
        client = MeshClient(self.settings.model_copy(update={"nats_url": url}), name=name)
        await client.connect()
        self._clients.append(client)
        return client

    async def _publish(self, c: MeshClient, pub: str) -> None:
        acked, times = self.progress.acked[pub], self.progress.ack_times[pub]
        n = 0
        while not self._stop_publishing.is_set():
            eid = f"{pub}-{n:05d}"
            while True:
                try:
                    await c.publish(SOURCE, "order.created", {"n": n}, id=eid, timeout=1.0)
                    break
                except Exception as exc:  # every failure is retried with the same id
                    self.progress.errors[f"publish {type(exc).__name__}"] += 1
                    if self._stop_publishing.is_set():
                        return  # abandoned unacked: the checker counts it if it was stored
                    await asyncio.sleep(0.1)
            acked.append(eid)
            times.append(time.monotonic())
            n += 1
            await asyncio.sleep(self.interval)

    async def _consume(self, c: MeshClient) -> None:
        while not self._stop_consuming.is_set():
            try:
                async for d in c.consume(TARGET, batch=50, expires=1.0, stop=self._stop_consuming):
                    self.progress.received.append(d.event.id)
                    self.progress.received_times.append(time.monotonic())
                    try:
                        await d.ack()
                    except Exception as exc:  # redelivered later: counted as a duplicate
                        self.progress.errors[f"ack {type(exc).__name__}"] += 1
            except Exception as exc:
                self.progress.errors[f"consume {type(exc).__name__}"] += 1
                await asyncio.sleep(0.2)

    def stop_publishing(self) -> None:
        self._stop_publishing.set()

    async def wait_consumed(self, timeout: float) -> set[str]:
        """Wait until the consumer has every acknowledged id; return those still missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = self.progress.all_acked() - set(self.progress.received)
            if not missing or time.monotonic() > deadline:
                return missing
            await asyncio.sleep(0.2)

    async def wait_acks(self, since: float, count: int, timeout: float) -> dict[str, int]:
        """Wait until each publisher has ``count`` acks after ``since``; return the counts."""
        deadline = time.monotonic() + timeout
        while True:
            got = {
                pub: self.progress.acked_between(pub, since, float("inf"))
                for pub in self.progress.acked
            }
            if min(got.values()) >= count or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self._stop_publishing.set()
        self._stop_consuming.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        sink, self._sink = self._sink, None
        if sink is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sink.stop(), 30)


async def stream_ids(c: MeshClient, timeout: float = 30.0) -> list[str]:
    """Every event id in the events stream, in stream order (an ephemeral ordered read)."""
    js = c.js
    stream = c.names.events
    info = await js.stream_info(stream)
    total = info.state.messages
    sub = await js.pull_subscribe(
        c.subjects.evt_all,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30
        ),
    )
    ids: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(ids) < total and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                for msg in await sub.fetch(256, timeout=2):
                    ids.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    finally:
        await sub.unsubscribe()
    if len(ids) < total:  # a short read is no evidence of loss: the caller asks again
        raise TimeoutError(f"read {len(ids)} of the stream's {total} messages in {timeout:.0f}s")
    return ids
