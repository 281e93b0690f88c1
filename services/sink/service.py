"""The persistence sink: every event, delivery attempt and dead letter into SQL tables.

Three durable pull consumers (``sink-events``, ``sink-sys``, ``sink-dlq``) are
fetched in batches; a batch is written in one transaction and its messages are
acked only after the commit, so a crash anywhere means redelivery, and the
store's ``ON CONFLICT DO NOTHING`` makes redelivery harmless. Several sinks may
run at once: the consumers spread the messages between them.

While the database is down the sink holds the batch it has (unacked, kept from
redelivery with ``in_progress``), retries with a capped exponential backoff and
fetches nothing more; ``db_ok`` says so for readiness. Payloads are stored as
they are in JetStream: the sink never decrypts.

It also mirrors the registry (targets and propagations) into the ``services``
and ``propagations`` tables, with an audit row for each change, keeps a
sample of heartbeats in ``health_checks``, and prunes rows past their retention
period (``services.sink.retention``).

Run alone with ``python -m services.sink`` or ``mesh serve sink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from mesh._nats.types import AckPolicy, ConsumerConfig, DeliverPolicy, Msg, Subscription, js_errors
from mesh.config import Settings
from mesh.errors import DecodeError, MeshError, StorageError
from mesh.observability import METRICS
from mesh.resilience import DATABASE_BACKOFF
from mesh.storage import (
    DeadLetterRow,
    DeliveryRow,
    EventRow,
    HealthCheckRow,
    RowsRefused,
    Store,
    WriteResult,
    backend_of,
    open_store,
)
from services.base import Service
from services.sink.audit import AuditFeed
from services.sink.mirror import RegistryMirror
from services.sink.retention import Retention, stored_days_reader
from services.sink.rows import (
    Row,
    dead_letter_row,
    delivery_rows,
    event_row,
    health_row,
)
from services.sink.spans import batch_written

BATCH_SIZE = 500
FETCH_WAIT_S = 0.5
ACK_WAIT_S = 15.0  # a crashed sink's batch comes back this soon; long writes send in_progress
DB_CHECK_INTERVAL_S = 5.0
HEALTH_SAMPLE_S = 60.0
HEALTH_BUFFER = 1000


# The service ----------------------------------------------------------------------


@dataclass(frozen=True)
class Feed:
    """One stream the sink drains."""

    kind: str  # events | sys | dlq
    stream: str
    consumer: str


class Sink(Service):
    name: ClassVar[str] = "sink"

    def __init__(
        self,
        settings: Settings,
        *,
        instance: str | None = None,
        batch_size: int = BATCH_SIZE,
        fetch_wait: float = FETCH_WAIT_S,
    ) -> None:
        super().__init__(settings, instance=instance)
        self.batch_size = batch_size
        self.fetch_wait = fetch_wait
        self.db_check_interval = DB_CHECK_INTERVAL_S
        self.store: Store | None = None
        self.db_ok = False
        self.db_error: str | None = None
        self._db_ready = asyncio.Event()
        self._store_lock = asyncio.Lock()
        self._health: deque[HealthCheckRow] = deque(maxlen=HEALTH_BUFFER)
        self._health_last: dict[tuple[str, str], tuple[float, str]] = {}
        self._health_sub: Subscription | None = None
        self._pulls: list[asyncio.Task[Any]] = []
        self.retention = Retention(
            settings, lambda: self.store, self.stopping, self.log, stored_days_reader(self.client)
        )
        self.mirror = RegistryMirror(
            self.client,
            lambda: self.store,
            db_ready=self._db_ready,
            db_down=self._db_down,
            stopping=self.stopping,
            log=self.log,
        )
        self.audits = AuditFeed(self, self.client.subjects.audit(""))
        self.counts: dict[str, int] = {
            "events": 0,
            "deliveries": 0,
            "dead_letters": 0,
            "health_checks": 0,
            "batches": 0,
            "messages": 0,
            "undecodable": 0,
            "terminated": 0,
            "refused": 0,
            "db_failures": 0,
        }
        names = self.client.names
        self.feeds = (
            Feed("events", names.events, "sink-events"),
            Feed("sys", names.sys, "sink-sys"),
            Feed("dlq", names.dlq, "sink-dlq"),
        )

    # Lifecycle ----------------------------------------------------------------

    async def on_start(self) -> None:
        backend_of(self.settings.db_url)  # a malformed URL is a config error: fail now
        if not await self._open_store():
            self.log.warning("database unreachable at start; retrying", error=self.db_error)
        for feed in self.feeds:
            await self._ensure_consumer(feed)
        self._health_sub = await self.client.port.subscribe(
            self.client.subjects.health_all,
            cb=self._on_heartbeat,
            pending_msgs_limit=HEALTH_BUFFER,
        )
        self._pulls = [
            self.spawn(self._pull_loop(feed), name=f"sink-{feed.kind}") for feed in self.feeds
        ]
        self.spawn(self._db_loop(), name="sink-db")
        self.spawn(self.mirror.run(), name="sink-registry")
        if self.retention.enabled:
            self.spawn(self.retention.run(), name="sink-retention")

    async def on_drain(self, timeout: float) -> None:
        # Pull loops see ``stopping`` once the batch in hand is written and acked.
        if self._pulls:
            await asyncio.wait(self._pulls, timeout=timeout)
        with contextlib.suppress(StorageError):
            await self._flush_health()

    async def on_close(self) -> None:
        if self._health_sub is not None:
            with contextlib.suppress(Exception):
                await self._health_sub.unsubscribe()
        store, self.store = self.store, None
        if store is not None:
            await store.close()

    def stats(self) -> dict[str, Any]:
        return {
            "db_ok": self.db_ok,
            "db_error": self.db_error,
            "backend": backend_of(self.settings.db_url),
            **self.counts,
            "pruned": self.retention.pruned,
        }

    # Database -----------------------------------------------------------------

    async def _open_store(self) -> bool:
        """Open and migrate the store if it is not open; True when it is usable."""
        async with self._store_lock:
            if self.store is not None:
                return True
            try:
                store = await open_store(self.settings.db_url)
            except StorageError as exc:
                self._db_down(exc)
                return False
            try:
                await store.migrate()
            except StorageError as exc:
                await store.close()
                self._db_down(exc)
                return False
            self.store = store
            self._db_up()
            with contextlib.suppress(StorageError):
                for problem in await store.durability_warnings():
                    self.log.warning("database commits are not durable", problem=problem)
            return True

    async def _drop_store(self) -> None:
        """Forget a store that failed its check; the next write or check opens a new one
        (a fresh pool, or a SQLite file created again if it was deleted)."""
        async with self._store_lock:
            store, self.store = self.store, None
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()

    def _db_up(self) -> None:
        if not self.db_ok and self.db_error is not None:
            self.log.info("database reachable again")
        self.db_ok = True
        self.db_error = None
        self._db_ready.set()

    def _db_down(self, exc: BaseException) -> None:
        if self.db_ok or self.db_error is None:
            self.log.warning("database unreachable", error=str(exc))
        self.db_ok = False
        self.db_error = str(exc)
        self.counts["db_failures"] += 1

    async def _db_loop(self) -> None:
        """Open the store if that failed at start; keep ``db_ok`` true to the database;
        write the sampled heartbeats."""
        while not self.stopping.is_set():
            if self.store is None:
                await self._open_store()
            else:
                try:
                    await self.store.ping()
                    self._db_up()
                    await self._flush_health()
                except StorageError as exc:
                    self._db_down(exc)
                    await self._drop_store()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.db_check_interval)

    async def _write(self, rows: list[Row]) -> WriteResult | None:
        """Write rows of one feed until it works, backing off while the database is down.

        Returns None if the sink began stopping first. ``RowsRefused`` (the database
        is up but will never take these rows) is raised, not retried.
        """
        events = [r for r in rows if isinstance(r, EventRow)]
        deliveries = [r for r in rows if isinstance(r, DeliveryRow)]
        dead = [r for r in rows if isinstance(r, DeadLetterRow)]
        delay = DATABASE_BACKOFF.first_s
        while True:
            if self.store is None:
                await self._open_store()
            store = self.store
            if store is not None:
                try:
                    result = await store.write_batch(events, deliveries, dead)
                except RowsRefused:
                    raise
                except StorageError as exc:
                    self._db_down(exc)
                else:
                    self._db_up()
                    return result
            self.log.debug("retrying database write", rows=len(rows), delay=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return None
            delay = DATABASE_BACKOFF.next(delay)

    async def _write_each(
        self, items: list[tuple[Msg, Row]], refused: list[Msg]
    ) -> WriteResult | None:
        """Row by row, to find the ones the database refuses; their messages go to ``refused``."""
        total = WriteResult()
        for msg, row in items:
            try:
                result = await self._write([row])
            except RowsRefused as exc:
                self.counts["refused"] += 1
                self.log.error(
                    "row refused by the database; message dropped",
                    subject=msg.subject,
                    error=str(exc),
                )
                refused.append(msg)
                continue
            if result is None:
                return None
            total += result
        return total

    # Feeds ----------------------------------------------------------------------

    async def _ensure_consumer(self, feed: Feed) -> None:
        config = ConsumerConfig(
            durable_name=feed.consumer,
            description=f"persistence sink ({feed.kind})",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S,
            max_deliver=-1,
            max_ack_pending=max(self.batch_size * 8, 1000),
            max_waiting=512,
        )
        try:
            await self.client.port.ensure_consumer(feed.stream, config)
        except js_errors.BadRequestError as exc:
            # Created by another sink with settings that cannot change: use it as it is.
            self.log.info("sink consumer kept as found", consumer=feed.consumer, error=str(exc))

    async def _pull_loop(self, feed: Feed) -> None:
        """Fetch the next batch while the last one is written: throughput is the slower of
        the two, not their sum. At most two batches are in hand (one writing, one queued)."""
        queue: asyncio.Queue[list[Msg] | None] = asyncio.Queue(maxsize=1)

        async def fetch() -> None:
            try:
                async for msgs in self.deliveries.pull(
                    feed.consumer,
                    batch=self.batch_size,
                    expires=self.fetch_wait,
                    stream=feed.stream,
                    stop=self.stopping,
                ):
                    await queue.put(msgs)
            finally:
                await queue.put(None)

        fetcher = asyncio.create_task(fetch(), name=f"sink-fetch-{feed.kind}")
        try:
            while (msgs := await queue.get()) is not None:
                if not await self.handle_batch(feed.kind, msgs):
                    break  # stopping with the database down: the rest is redelivered
        finally:
            fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetcher

    def _rows(self, kind: str, msgs: list[Msg]) -> tuple[list[tuple[Msg, Row]], list[Msg]]:
        """Each message with its row, and the messages that make no row at all."""
        items: list[tuple[Msg, Row]] = []
        drop: list[Msg] = []
        subjects = self.client.subjects
        for msg in msgs:
            row: Row
            problem: str | None = None
            try:
                if kind == "events":
                    row, problem = event_row(msg, subjects)
                elif kind == "sys":
                    # A batch of attempts is one message with several rows.
                    items.extend((msg, r) for r in delivery_rows(msg))
                    continue
                else:
                    row, problem = dead_letter_row(msg, subjects)
            except DecodeError as exc:
                self.counts["undecodable"] += 1
                self.log.warning("undecodable message dropped", subject=msg.subject, error=str(exc))
                drop.append(msg)
                continue
            if problem is not None:
                self.counts["undecodable"] += 1
                self.log.warning("message stored as found", subject=msg.subject, error=problem)
            items.append((msg, row))
        return items, drop

    async def handle_batch(self, kind: str, msgs: list[Msg]) -> bool:
        """Write one fetched batch and ack it; False if stopped before the write landed."""
        if kind == "sys":  # the HTTP API's audit records travel with the delivery records
            audits, msgs = self.audits.split(msgs)
            if audits and not await self.audits.handle(audits):
                return False
        items, drop = self._rows(kind, msgs)
        if items:
            started = time.time_ns()
            async with self._holding(list({id(m): m for m, _ in items}.values())):
                try:
                    result = await self._write([row for _, row in items])
                except RowsRefused as exc:
                    # One bad row must not block the feed: find it, drop it, keep the rest.
                    self.log.warning("batch refused; writing row by row", feed=kind, error=str(exc))
                    result = await self._write_each(items, drop)
            if result is None:
                return False  # unacked: redelivered to this or another sink
            batch_written(kind, items, started, self.settings.db_url)  # traces, if on
            for table, n in (
                ("events", result.events),
                ("deliveries", result.deliveries),
                ("dead_letters", result.dead_letters),
            ):
                if n:
                    self.counts[table] += n
                    METRICS.sink_rows_written.labels(table).inc(n)
        # A message of several rows (a batch of attempts) is settled once; if the database
        # refused one of its rows, it is terminated like a single refused record (the
        # rows written stay written).
        dropped = {id(m) for m in drop}
        keep = {id(m): m for m, _ in items if id(m) not in dropped}
        await self._settle(list(keep.values()), list({id(m): m for m in drop}.values()))
        self.counts["batches"] += 1
        self.counts["messages"] += len(msgs)
        return True

    async def _settle(self, keep: list[Msg], drop: list[Msg]) -> None:
        # After the commit: an ack that gets lost only means a harmless redelivery.
        for msg in keep:
            with contextlib.suppress(Exception):
                await msg.ack()
        for msg in drop:
            with contextlib.suppress(Exception):
                await msg.term()
                self.counts["terminated"] += 1

    @contextlib.asynccontextmanager
    async def _holding(self, msgs: list[Msg]) -> AsyncIterator[None]:
        """While a write waits for the database, keep its batch from being redelivered."""

        async def hold() -> None:
            while True:
                await asyncio.sleep(ACK_WAIT_S / 3)
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

        task = asyncio.create_task(hold())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # Heartbeats -------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            row = health_row(msg.data)
        except (ValueError, TypeError):
            return
        # One sample a minute per instance, or any change of status: enough history
        # without a row every five seconds per service forever.
        key = (row.service, row.instance)
        last = self._health_last.get(key)
        mono = time.monotonic()
        if last is not None and last[1] == row.status and mono - last[0] < HEALTH_SAMPLE_S:
            return
        self._health_last[key] = (mono, row.status)
        self._health.append(row)

    async def _flush_health(self) -> None:
        if not self._health or self.store is None:
            return
        rows = list(self._health)
        try:
            result = await self.store.write_batch(health_checks=rows)
        except RowsRefused as exc:
            # A heartbeat sample is expendable; a refused one must not come back forever.
            self.log.warning("heartbeat samples refused by the database", error=str(exc))
            result = WriteResult()
        for _ in rows:
            self._health.popleft()
        if result.health_checks:
            self.counts["health_checks"] += result.health_checks
            METRICS.sink_rows_written.labels("health_checks").inc(result.health_checks)

    # Registry mirror --------------------------------------------------------------

    async def resync_registry(self) -> None:
        """Make the tables match the registry: upsert what is there, delete what is not."""
        await self.mirror.resync()


def main() -> None:
    """``python -m services.sink``: the sink alone, on MESH_NATS_URL and MESH_DB_URL."""
    from mesh.config import load_settings
    from mesh.observability import configure_logging
    from services.runner import main_sync

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    if settings.embedded:
        settings = settings.model_copy(update={"nats_url": settings.servers[0]})
    try:
        main_sync(["sink"], settings)
    except MeshError as exc:
        raise SystemExit(f"mesh sink: error: {exc}") from None


if __name__ == "__main__":
    main()


__all__ = ["Sink", "main"]
