"""The egress: durable, resilient delivery to every target it drives: signed webhooks
over HTTP, and the destinations beyond HTTP (AMQP, MQTT, Redis Streams, SQS, S3) through
the drivers in services/egress/drivers/.

``mesh serve webhook-egress`` runs it alone; ``mesh up`` runs it with the others. One
``TargetWorker`` (services/egress/worker.py) per active webhook target pulls the target's
``deliver-<target>`` consumer; the registry is watched, so targets added, changed,
disabled or removed take effect without a restart.

Several instances may run against one broker; the consumers spread the work. What is
per-instance is kept correct when split:

- **Circuit breakers** are shared through a KV bucket with compare-and-set transitions
  and a probe lease, and an open circuit pauses the target's consumer on the server
  (services/egress/circuit.py): exactly one probe goes out however many instances run.
- **Rate limits**: instances see each other through their heartbeats
  (``<prefix>.sys.health.webhook-egress.*``); each takes ``rate / N`` of a target's rate,
  N being the instances alive. When one joins, the others answer with a heartbeat at
  once, so the split adjusts within milliseconds; when one dies, the others notice after
  three missed heartbeats and the aggregate rate is briefly below the limit, never above.
- **Ordering**: an ordered target's consumer allows one unacknowledged message, so one
  request is in flight across all instances.

Graceful stop (SIGTERM): stop pulling, hand back what has not been sent, let requests on
the wire finish within the drain timeout, hand back the rest (nak), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from mesh._nats.pubpipe import PubPipe  # the type of client.port.pubpipe()
from mesh._nats.types import Msg, Subscription
from mesh.config import Settings
from mesh.destinations import missing_extra
from mesh.errors import DecodeError, NotFound
from mesh.records import DeliveryRecord, batch_bodies, new_id
from mesh.registry import EGRESS_KINDS, TargetStatus
from mesh.subjects import key_ref
from services.base import Service
from services.egress.circuit import CircuitStore
from services.egress.fairness import TenantSlots
from services.egress.http.sender import HttpSender
from services.egress.shared import EgressShared
from services.egress.worker import FETCH_EXPIRES_S, TargetWorker

DEFAULT_MAX_IN_FLIGHT = 512  # requests on the wire across every target of one instance
RESYNC_S = 30.0  # full registry re-read, in case a watch went quiet
PEER_MISSES = 3  # heartbeats an instance may miss before it no longer counts


class WebhookEgress(Service):
    name: ClassVar[str] = "webhook-egress"

    def __init__(
        self,
        settings: Settings,
        *,
        instance: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        fetch_expires_s: float = FETCH_EXPIRES_S,
    ) -> None:
        super().__init__(settings, instance=instance)
        self.max_in_flight = max_in_flight
        # How long an idle fetch waits at the server; also what a drain may wait for it.
        self.fetch_expires_s = fetch_expires_s
        self.slots = asyncio.Semaphore(max_in_flight)
        self.tenant_slots = TenantSlots(max_in_flight, settings.egress_tenant_share)
        self.http = HttpSender(settings.allow_private_targets, limit=max_in_flight)
        self.workers: dict[str, TargetWorker] = {}
        self.circuits: CircuitStore | None = None
        self.shared: EgressShared | None = None  # what the workers get (on_start)
        self.peers: dict[str, float] = {}  # other instances -> last heartbeat (monotonic)
        self._sync_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._peer_sub: Subscription | None = None
        self._records: PubPipe | None = None
        self._records_failed = 0

    # Lifecycle ----------------------------------------------------------------

    async def on_start(self) -> None:
        self.client.keyring_or_none()  # a missing or bad key file stops the start, not a delivery
        self._records = await self.client.port.pubpipe(on_failure=self._record_failed).open()
        events = self.client.names.events
        bucket = events.removesuffix("_EVENTS") + "_CIRCUITS"
        self.circuits = await CircuitStore.open(
            self.client.port, bucket, replicas=self.settings.stream_replicas
        )
        self.shared = EgressShared(
            client=self.client,
            deliveries=self.deliveries,
            log=self.log,
            instance=self.instance,
            circuits=self.circuits,
            http=self.http,
            slots=self.slots,
            fetch_expires_s=self.fetch_expires_s,
            spawn=self.spawn,
            instance_count=self.instance_count,
            record=self.record,
            record_batch=self.record_batch,
            sync_target=self.sync_target,
            tenant_slots=self.tenant_slots,
        )
        self._peer_sub = await self.client.port.subscribe(
            self.client.subjects.health(self.name, "*"), cb=self._on_peer
        )
        if self.heartbeat is not None:
            await self.heartbeat.beat()  # announce ourselves before taking any rate share
        await self.resync()
        self.spawn(self._watch_registry(), name="egress-registry-watch")
        self.spawn(self._watch_circuits(), name="egress-circuit-watch")
        self.spawn(self._housekeeping(), name="egress-housekeeping")

    async def on_drain(self, timeout: float) -> None:
        workers = list(self.workers.values())
        await asyncio.gather(
            *(w.stop(timeout) for w in workers), *self._retiring, return_exceptions=True
        )

    async def on_close(self) -> None:
        for worker in list(self.workers.values()):
            await worker.stop(0.1)
        self.workers.clear()
        if self._retiring:
            _, late = await asyncio.wait(set(self._retiring), timeout=1.0)
            for task in late:
                task.cancel()
        if self._peer_sub is not None:
            with contextlib.suppress(Exception):
                await self._peer_sub.unsubscribe()
        # Let the last delivery records reach the broker.
        if self._records is not None:
            with contextlib.suppress(Exception):
                await self._records.flush(2.0)
            await self._records.close()
        await self.http.close()

    # Targets ------------------------------------------------------------------

    async def resync(self) -> None:
        """Bring the workers in line with every target in the registry."""
        targets = await self.client.registry.list_targets()
        names = {t.ref for t in targets}
        for t in targets:
            await self.sync_target(t.ref)
        for name in list(self.workers):
            if name not in names:
                await self.sync_target(name)

    async def sync_target(self, name: str) -> None:
        """Start, update or stop the worker of one target (``name``: its reference) after a
        registry change."""
        async with self._sync_lock:
            if self.stopping.is_set():
                return
            try:
                target = await self.client.registry.get_target(name)
            except NotFound:
                self._retire(name, forget=True)
                return
            except DecodeError as exc:
                self.log.error("unreadable target entry", target=name, error=str(exc))
                return
            wanted = (
                target.kind in EGRESS_KINDS
                and target.status == TargetStatus.ACTIVE
                and bool(target.url)
            )
            worker = self.workers.get(name)
            missing = missing_extra(target.kind) if wanted else None
            if missing is not None:
                # Its events stay queued: another instance, or this one after an
                # install and a restart, delivers them.
                self.log.error("cannot deliver to target: " + missing, target=name)
            if not wanted or missing is not None:
                self._retire(name)
                return
            if worker is not None and worker.halt.is_set():
                self._retire(name)
                worker = None
            if worker is None:
                assert self.shared is not None  # set by on_start, before any sync
                try:
                    worker = TargetWorker(self.shared, target)
                except DecodeError as exc:  # a sealed URL the key ring cannot open
                    self.log.error("cannot deliver to target", target=name, error=str(exc))
                    return
                self.workers[name] = worker
                self.tenant_slots.add(target.tenant)
                worker.start()
                self.log.info("delivering to target", target=name)
            elif target.model_dump() != worker.target.model_dump():
                worker.update(target)
                self.log.info("target updated", target=name)

    def _retire(self, name: str, forget: bool = False) -> None:
        """Stop a target's worker in the background: its in-flight requests may take a
        while, and other targets' changes must not wait for them."""
        worker = self.workers.pop(name, None)
        if worker is None:
            return
        self.tenant_slots.remove(worker.target.tenant)
        task = asyncio.create_task(self._stop_worker(worker, forget), name=f"retire-{name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _stop_worker(self, worker: TargetWorker, forget: bool) -> None:
        await worker.stop(self.settings.drain_timeout_s)
        if forget:
            await worker.circuit.forget()
        self.log.info("stopped delivering to target", target=worker.name)

    async def _watch_registry(self) -> None:
        while not self.stopping.is_set():
            try:
                async for key in self.client.registry.watch():
                    ref = key_ref(key)
                    if ref is not None:
                        await self.sync_target(ref)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("registry watch interrupted", error=str(exc) or repr(exc))
            await asyncio.sleep(1.0)

    async def _watch_circuits(self) -> None:
        while not self.stopping.is_set():
            try:
                assert self.circuits is not None
                async for key, record, revision in self.circuits.watch():
                    worker = self.workers.get(key)
                    if worker is not None:
                        worker.circuit.apply(record, revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("circuit watch interrupted", error=str(exc) or repr(exc))
            await asyncio.sleep(1.0)

    async def _housekeeping(self) -> None:
        last_resync = time.monotonic()
        while not self.stopping.is_set():
            await asyncio.sleep(max(0.5, self.settings.heartbeat_interval_s))
            self._expire_peers()
            if time.monotonic() - last_resync >= RESYNC_S:
                last_resync = time.monotonic()
                try:
                    await self.resync()
                except Exception as exc:
                    self.log.warning("registry resync failed", error=str(exc) or repr(exc))

    # Peers (for rate shares) --------------------------------------------------

    def instance_count(self) -> int:
        return 1 + len(self.peers)

    async def _on_peer(self, msg: Msg) -> None:
        try:
            doc = json.loads(msg.data)
            instance = str(doc["instance"])
            status = str(doc.get("status", "ok"))
        except (ValueError, KeyError, TypeError):
            return
        if instance == self.instance:
            return
        before = self.instance_count()
        if status == "stopped":
            self.peers.pop(instance, None)
        else:
            new = instance not in self.peers
            self.peers[instance] = time.monotonic()
            if new and self.heartbeat is not None and not self.stopping.is_set():
                await self.heartbeat.beat()  # so the newcomer counts us right away
        if self.instance_count() != before:
            self._reshare()

    def _expire_peers(self) -> None:
        horizon = time.monotonic() - PEER_MISSES * self.settings.heartbeat_interval_s
        gone = [i for i, seen in self.peers.items() if seen < horizon]
        for instance in gone:
            del self.peers[instance]
        if gone:
            self._reshare()

    def _reshare(self) -> None:
        for worker in self.workers.values():
            worker.configure_rate()

    # Records ------------------------------------------------------------------

    async def record(self, rec: DeliveryRecord, *, settle: Msg | None = None) -> None:
        """Publish a delivery-attempt record, pipelined: its acknowledgement is checked in
        the background (mesh/pubpipe.py: a refused or unacknowledged record is published
        again, the same ``Nats-Msg-Id`` keeping it single). Waits only while 1,024 records
        are unacknowledged: a stalled broker holds the delivery here, which stops fetching
        (backpressure). ``settle`` is acked once the record is stored, and handed back
        (nak) if it cannot be: no event is acked before its record is durable."""
        pipe = self._records
        tag = (rec, settle)
        try:
            if pipe is None:
                raise RuntimeError("the egress is not started")
            await pipe.publish(
                self.client.subjects.delivery(rec.target),
                rec.to_bytes(),
                {"Nats-Msg-Id": rec.id},
                tag,
                None if settle is None else functools.partial(self._ack, settle, rec),
            )
        except Exception as exc:
            self._record_failed(tag, str(exc) or type(exc).__name__)

    async def record_batch(self, recs: list[DeliveryRecord], settle: list[Msg]) -> None:
        """Publish the attempts of a settled batch as one message (mesh/records.py), then
        ack ``settle`` once it is stored, or hand them back if it cannot be: as ``record``,
        one stream write and one acknowledgement for the whole batch. A batch split into
        several messages (long errors) is acked once every one of them is stored, and
        handed back if any of them cannot be."""
        if not recs:
            return
        pipe = self._records
        bodies = batch_bodies(recs)
        subject = self.client.subjects.delivery(recs[0].target)
        parts = _Parts(settle, len(bodies))
        tag = (recs[0], parts)
        for body in bodies:
            try:
                if pipe is None:
                    raise RuntimeError("the egress is not started")
                await pipe.publish(
                    subject,
                    body,
                    {"Nats-Msg-Id": "b-" + new_id()},
                    tag,
                    functools.partial(self._part_stored, parts),
                )
            except Exception as exc:
                self._record_failed(tag, str(exc) or type(exc).__name__)
                return  # handed back: the rest would only be recorded twice

    async def _part_stored(self, parts: _Parts) -> None:
        parts.left -= 1
        if parts.left == 0 and not parts.failed:
            # One command for the batch's acks (mesh/_nats/acks.py).
            for _msg, exc in await self.client.port.ack_many(parts.msgs):
                # Done and recorded: a lost ack means a duplicate, not a loss.
                self.log.warning("ack failed", error=str(exc))

    async def _ack(self, msg: Msg, rec: DeliveryRecord) -> None:
        try:
            await msg.ack()
        except Exception as exc:  # done and recorded; a lost ack means a duplicate, not a loss
            self.log.warning("ack failed", event_id=rec.event_id, error=str(exc))

    def _record_failed(self, tag: tuple[DeliveryRecord, Msg | _Parts | None], error: str) -> None:
        rec, settle = tag
        # Not acked: the events come again (after the ack wait at the latest).
        if isinstance(settle, _Parts):
            msgs = [] if settle.failed else settle.msgs  # one batch is handed back once
            settle.failed = True
        else:
            msgs = [settle] if settle is not None else []
        for msg in msgs:
            self.spawn(_nak(msg), name=f"nak-{rec.event_id}")
        self._records_failed += 1
        self.log.warning(
            "delivery record not published",
            target=rec.target,
            event_id=rec.event_id,
            error=error,
        )

    # Heartbeat ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        workers = dict(self.workers)
        per_target = {name: w.stats() for name, w in workers.items()}
        totals = {
            key: sum(int(s[key]) for s in per_target.values())
            for key in ("delivered", "retried", "dead", "skipped")
        }
        return {
            "circuits": {name: w.circuit.state.value for name, w in workers.items()},
            "in_flight": sum(w.on_wire for w in workers.values()),
            "max_in_flight": self.max_in_flight,
            "targets": per_target,
            "instances": self.instance_count(),
            "records_failed": self._records_failed,
            **totals,
        }


@dataclass
class _Parts:
    """A batch's messages and its record messages not yet stored (``record_batch``)."""

    msgs: list[Msg]
    left: int
    failed: bool = False


async def _nak(msg: Msg) -> None:
    with contextlib.suppress(Exception):
        await msg.nak()
