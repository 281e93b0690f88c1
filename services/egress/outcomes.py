"""What becomes of a message after a delivery attempt (mixed into ``TargetWorker``).

- 2xx (or a driver's acknowledged send): record ``delivered``, then ack.
- refused by the SSRF guard, or a permanent failure of a driver (a missing exchange,
  queue or bucket): dead letter (the reason), ack; never retried.
- 410 Gone: mark the target disabled in the registry, dead letter, ack.
- anything else: the circuit learns of the failure first, then the message is nak-ed
  with the policy's delay (or the receiver's ``Retry-After``, whichever is longer);
  after the last attempt it is dead-lettered, then acked.

Every attempt leaves one ``DeliveryRecord``, collected in the batch's ``Settlement`` and
published with the others of its chunk as one message (services/egress/batch.py). A
message is acked only once everything it caused is stored by the broker (issue #14): its
dead letter (awaited) and its record (the ack waits for the acknowledgement of the
records' message, pipelined). A dead letter or a record that cannot be stored is not
acked: the message is handed back and comes again. A retry's nak goes out at once, its
record with the chunk's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mesh import tracing
from mesh._nats.types import Msg
from mesh.delivery import MessageHeaders
from mesh.envelope import Event
from mesh.observability import METRICS
from mesh.records import BatchStamps, DeliveryRecord, Outcome
from mesh.registry import Target, TargetStatus
from mesh.resilience import is_last_attempt, retry_delay
from services.egress.http.sender import AttemptResult
from services.egress.spans import mark

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.delivery import Deliveries
    from services.egress.circuit import SharedCircuit
    from services.egress.shared import EgressShared

DLQ_RETRY_S = 5.0  # when the DLQ itself cannot be written, try the message again after this


class Settlement:
    """The records of a chunk's attempts, and the messages to ack once they are stored.
    The records of one chunk share a time (when its first was settled) and an id prefix
    (``BatchStamps``). ``attempts`` and ``delivered`` count for the metrics, added to
    them once per chunk (``count``) rather than per attempt."""

    __slots__ = ("acks", "attempts", "delivered", "records", "stamps")

    def __init__(self) -> None:
        self.records: list[DeliveryRecord] = []
        self.acks: list[Msg] = []
        self.stamps = BatchStamps()
        self.attempts = 0
        self.delivered = 0

    def count(self, attempts: Any, delivered: Any) -> None:
        """Add the attempts and deliveries counted so far to these metrics."""
        if self.attempts:
            attempts.inc(self.attempts)
            self.attempts = 0
        if self.delivered:
            delivered.inc(self.delivered)
            self.delivered = 0

    def add(self, rec: DeliveryRecord, settle: Msg | None) -> None:
        self.records.append(rec)
        if settle is not None:
            self.acks.append(settle)

    def take(self) -> tuple[list[DeliveryRecord], list[Msg]]:
        records, acks = self.records, self.acks
        self.records, self.acks = [], []
        self.stamps.reset()
        return records, acks


class Outcomes:
    """Settling messages; the state it uses belongs to ``TargetWorker``."""

    name: str
    target: Target
    window: float
    egress: EgressShared
    client: MeshClient
    deliveries: Deliveries
    circuit: SharedCircuit
    log: Any
    halt: asyncio.Event
    counts: dict[str, int]
    _held: dict[int, tuple[Msg, float]]
    _m_attempts: Any
    _m_latency: Any
    _m_e2e: Any
    _m_delivered: Any
    _m_retry: Any

    def _kick(self) -> None:
        raise NotImplementedError

    async def _settle(
        self,
        out: Settlement,
        msg: Msg,
        event: Event,
        attempt: int,
        target: Target,
        result: AttemptResult,
        probe: bool,
    ) -> None:
        self._held.pop(id(msg), None)
        out.attempts += 1  # self._m_attempts, per chunk (Settlement.count)
        answered = result.status is not None or result.delivered or result.permanent
        latency_ms = round(result.latency_s * 1000, 3) if answered else None
        if answered:
            self._m_latency.observe(result.latency_s)
        if result.ok:
            await self.circuit.on_result(True, probe)
            self.counts["delivered"] += 1
            out.delivered += 1  # self._m_delivered, per chunk
            self._m_e2e.observe(max(0.0, time.time() - event.time.timestamp()))
            self._record(
                out,
                event.id,
                attempt,
                Outcome.DELIVERED,
                result.status,
                latency_ms,
                settle=msg,
                trace=event,
            )
            return
        error = result.error or "failed"
        if result.refused or result.permanent:
            if probe:
                self.circuit.release_probe()
            await self._dead(out, msg, event, attempt, error, Outcome.DEAD)
            return
        if result.gone:
            if probe:
                self.circuit.release_probe()
            self.log.warning(
                "receiver answered 410 Gone: disabling the target",
                event_id=event.id,
                attempt=attempt,
            )
            when = datetime.now(UTC).isoformat(timespec="seconds")
            await self._disable(f"HTTP 410 Gone at {when}")
            await self._dead(
                out, msg, event, attempt, "HTTP 410 Gone: target disabled", Outcome.DISABLED, 410
            )
            return
        # The circuit learns first, so an opening pauses the consumer before this nak
        # can bring the message straight back.
        await self.circuit.on_result(False, probe)
        log = self.log.bind(event_id=event.id, attempt=attempt, status=result.status)
        if is_last_attempt(target.retry, attempt):
            await self._dead(
                out, msg, event, attempt, error, Outcome.DEAD, result.status, latency_ms
            )
            return
        delay = retry_delay(target.retry, attempt, result.retry_after)
        try:
            await msg.nak(delay=delay)
        except Exception as exc:  # the ack wait brings it back anyway
            log.warning("nak failed", error=str(exc))
        self.counts["retried"] += 1
        self._m_retry.inc()
        log.info("delivery failed, will retry", error=error[:120], retry_in_s=round(delay, 3))
        self._record(
            out, event.id, attempt, Outcome.RETRY, result.status, latency_ms, error, trace=event
        )

    async def _skip(self, out: Settlement, msg: Msg, event: Event, reason: str) -> None:
        self._held.pop(id(msg), None)
        self.counts["skipped"] += 1
        METRICS.deliveries.labels(self.name, Outcome.SKIPPED.value).inc()
        if tracing.TRACER is not None and tracing.wanted(event):
            mark("skip", self.name, event, 0, None)  # the reason may quote a filter: not here
        self._record(out, event.id, 0, Outcome.SKIPPED, error=reason, settle=msg, trace=event)

    async def _dead(
        self,
        out: Settlement,
        msg: Msg,
        event: Event | None,
        attempt: int,
        error: str,
        outcome: Outcome,
        status: int | None = None,
        latency_ms: float | None = None,
    ) -> None:
        """Dead-letter, then ack; if the DLQ does not take it, hand the message back."""
        self._held.pop(id(msg), None)
        event_id = event.id if event is not None else _header_id(msg)
        log = self.log.bind(event_id=event_id, attempt=attempt)
        try:
            await self.deliveries.dead_letter(msg, self.name, error, attempt)
        except Exception as exc:
            log.error("dead letter not stored, handing the event back", error=str(exc))
            await self._hand_back(msg, delay=DLQ_RETRY_S)
            return
        self.counts["dead"] += 1
        METRICS.deliveries.labels(self.name, outcome.value).inc()
        log.warning("event dead-lettered", reason=error[:200])
        if tracing.TRACER is not None and event is not None and tracing.wanted(event):
            mark("dead-letter", self.name, event, attempt, outcome.value)
        self._record(
            out, event_id, attempt, outcome, status, latency_ms, error, settle=msg, trace=event
        )

    def _record(
        self,
        out: Settlement,
        event_id: str,
        attempt: int,
        outcome: Outcome,
        status: int | None = None,
        latency_ms: float | None = None,
        error: str | None = None,
        *,
        settle: Msg | None = None,
        trace: Event | None = None,
    ) -> None:
        """Add the record of one attempt at this target by this instance to ``out``;
        ``settle``: the message this attempt finished, acked only once its record is
        stored; the record carries the trace id ``trace`` carries, if any."""
        record_id, at = out.stamps.next()
        out.add(
            DeliveryRecord(
                event_id=event_id,
                target=self.name,
                attempt=attempt,
                outcome=outcome,
                status_code=status,
                latency_ms=latency_ms,
                error=error,
                instance=self.egress.instance,
                trace_id=tracing.trace_id_of(trace) if trace is not None else None,
                tenant=self.target.tenant,
                at=at,
                id=record_id,
            ),
            settle,
        )

    async def _disable(self, reason: str) -> None:
        self.log.warning("disabling the target", reason=reason)
        try:
            await self.client.registry.set_status(self.name, TargetStatus.DISABLED, reason)
        except Exception as exc:
            self.log.error("could not mark the target disabled", error=str(exc))
        # Stop pulling now; the registry watch would get here too.
        self.halt.set()
        self._kick()
        self.egress.spawn(self.egress.sync_target(self.name), f"sync-{self.name}")

    async def _hand_back(self, msg: Msg, delay: float | None = None) -> None:
        self._held.pop(id(msg), None)
        if self.halt.is_set():
            # Stopping: a pull request of ours may still be open at the server for up to
            # one fetch window; an immediate redelivery could land in it, after we stopped
            # reading, and wait out the ack wait. Come back once it has expired.
            delay = max(delay or 0.0, self.window + 0.1)
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)


def _header_id(msg: Msg) -> str:
    seq = msg.metadata.sequence.stream if msg.metadata.sequence else None
    return MessageHeaders.of(msg).event_id(seq)
