"""Circuit breakers shared by every egress instance.

Each instance counts consecutive failures per target on its own (a local
``CircuitBreaker``). The *state* of a target's circuit lives in a JetStream KV bucket
(``<PREFIX>_CIRCUITS``, key = the target's reference as ``mesh.subjects.ref_kv`` writes
it) and every transition is a compare-and-set on the key's revision, so instances agree on it:

- closed -> open: the instance whose failures reach the threshold writes
  ``open until T`` and pauses the target's consumer until T. From that moment the server
  hands no message of that target to anyone, and no instance asks for one.
- open -> half-open: at T every instance tries to write ``half_open, probe = me,
  lease until L``; the compare-and-set lets exactly one win. The winner resumes the
  consumer, takes one message (one it holds, or a fetch of one) and sends it: the probe.
  Losers neither fetch nor send. The lease is renewed while the winner waits for a
  message; a probe is only sent while the lease outlives the request timeout, and a
  dead winner's lease expires so another instance can take over.
- half-open -> closed on the probe's success, -> open (a new period, paused again) on its
  failure.

Messages an instance already holds when the circuit opens wait (kept alive with
``in_progress``) instead of being sent or nak-ed, so they spend no attempt.

When the KV store cannot be written, the instance keeps going on its local view: it
still stops sending to a failing target, it just cannot tell the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import structlog

from mesh._nats.types import KeyValue, js_errors
from mesh.observability import METRICS
from mesh.resilience import CircuitBreaker, CircuitState
from mesh.subjects import kv_ref, ref_kv

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

log = structlog.get_logger("mesh.webhook-egress.circuit")

Clock = Callable[[], float]


@dataclass
class CircuitRecord:
    """The shared state of one target's circuit (times are Unix seconds)."""

    state: CircuitState = CircuitState.CLOSED
    until: float = 0.0  # end of the open period
    probe: str | None = None  # instance holding the probe lease
    lease_until: float = 0.0
    by: str | None = None  # instance that wrote this
    at: float = 0.0

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["state"] = self.state.value
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> CircuitRecord:
        if not raw:
            return cls()
        try:
            doc = json.loads(raw)
            return cls(
                state=CircuitState(doc.get("state", "closed")),
                until=float(doc.get("until") or 0.0),
                probe=doc.get("probe"),
                lease_until=float(doc.get("lease_until") or 0.0),
                by=doc.get("by"),
                at=float(doc.get("at") or 0.0),
            )
        except (ValueError, TypeError, AttributeError):
            return cls()  # a garbled entry reads as closed; the next transition rewrites it


class CircuitStore:
    """The KV bucket holding every target's ``CircuitRecord``, by target reference (a
    tenant's ``~T.name`` is the key ``T.name``: KV keys cannot hold ``~``)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, port: JetStreamPort, bucket: str, replicas: int = 1) -> CircuitStore:
        return cls(await port.open_bucket(bucket, history=1, replicas=replicas))

    async def get(self, key: str) -> tuple[CircuitRecord, int | None]:
        try:
            entry = await self.kv.get(ref_kv(key))
        except js_errors.KeyNotFoundError as exc:
            # A deleted key still has a revision to compare against.
            entry_rev = getattr(getattr(exc, "entry", None), "revision", None)
            return CircuitRecord(), entry_rev
        return CircuitRecord.from_bytes(entry.value), entry.revision

    async def cas(self, key: str, record: CircuitRecord, revision: int | None) -> int | None:
        """Write when the key is still at ``revision``; the new revision, or None if not."""
        try:
            if revision is None:
                return int(await self.kv.create(ref_kv(key), record.to_bytes()))
            return int(await self.kv.update(ref_kv(key), record.to_bytes(), last=revision))
        except js_errors.KeyWrongLastSequenceError:
            return None

    async def delete(self, key: str) -> None:
        with contextlib.suppress(js_errors.KeyNotFoundError):
            await self.kv.delete(ref_kv(key))

    async def watch(self) -> AsyncIterator[tuple[str, CircuitRecord, int]]:
        """Every record (first the current ones), then every change, until cancelled."""
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                record = CircuitRecord() if deleted else CircuitRecord.from_bytes(entry.value)
                yield kv_ref(entry.key), record, int(entry.revision or 0)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


class SharedCircuit:
    """One target's circuit as this instance sees and drives it."""

    def __init__(
        self,
        target: str,
        instance: str,
        store: CircuitStore | None,
        *,
        threshold: int,
        open_s: float,
        timeout_s: float,
        pause: Callable[[float], Awaitable[None]],
        resume: Callable[[], Awaitable[None]],
        clock: Clock = time.time,
    ) -> None:
        self.target = target
        self.instance = instance
        self.store = store
        self.clock = clock
        self.breaker = CircuitBreaker(threshold, open_s, clock=clock)
        self.timeout_s = timeout_s
        self.record = CircuitRecord()
        self.revision: int | None = None
        self._pause = pause
        self._resume = resume
        self._lock = asyncio.Lock()
        self._event = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []
        self.opened = 0  # times this instance opened it (stats)
        METRICS.circuit_state.labels(target).set(CircuitState.CLOSED.gauge)

    # Configuration --------------------------------------------------------

    def configure(self, threshold: int, open_s: float, timeout_s: float) -> None:
        self.breaker.threshold = threshold
        self.breaker.open_s = open_s
        self.timeout_s = timeout_s

    @property
    def lease_s(self) -> float:
        return 2 * self.timeout_s + 10.0

    @property
    def _renew_margin(self) -> float:
        return self.timeout_s + 5.0

    # The local view ---------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        return self.record.state

    def is_owner(self) -> bool:
        return (
            self.record.state is CircuitState.HALF_OPEN
            and self.record.probe == self.instance
            and self.record.lease_until > self.clock()
        )

    @property
    def probe_out(self) -> bool:
        return self.breaker.probe_out

    def lease_ok(self) -> bool:
        """The lease outlives a whole request: a probe sent now finishes under it."""
        return self.is_owner() and self.record.lease_until - self.clock() >= self.timeout_s + 1

    def try_probe(self) -> bool:
        """Hand out the probe (once) when this instance holds a long enough lease."""
        if not self.lease_ok():
            return False
        if self.breaker.state is not CircuitState.HALF_OPEN:
            self.breaker.half_open()
        return self.breaker.allow()

    def release_probe(self) -> None:
        self.breaker.release_probe()
        self._notify()

    def apply(self, record: CircuitRecord, revision: int | None) -> None:
        """Adopt a record (from the watch or our own write); stale revisions are ignored."""
        if revision is not None and self.revision is not None and revision < self.revision:
            return
        before = (self.record.state, self.record.probe, self.record.until, self.record.lease_until)
        self.record = record
        self.revision = revision
        b = self.breaker
        if record.state is CircuitState.CLOSED:
            if b.state is not CircuitState.CLOSED:
                b.reset()
        elif record.state is CircuitState.OPEN:
            if b.state is not CircuitState.OPEN or b.opened_until != record.until:
                b.trip(until=record.until)
        elif b.state is not CircuitState.HALF_OPEN or before[1] != record.probe:
            b.half_open()
        METRICS.circuit_state.labels(self.target).set(record.state.gauge)
        after = (record.state, record.probe, record.until, record.lease_until)
        if after != before:
            self._notify()

    def _notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()
        for listener in self.listeners:
            listener()

    def changed(self) -> asyncio.Event:
        """An event set at the next change of state (take it before looking at the state)."""
        return self._event

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do (Unix seconds), or None."""
        r = self.record
        if r.state is CircuitState.OPEN:
            return r.until
        if r.state is CircuitState.HALF_OPEN:
            if r.probe == self.instance:
                return r.lease_until - self._renew_margin
            return r.lease_until
        return None

    # Transitions ----------------------------------------------------------------

    async def _write(self, record: CircuitRecord) -> bool:
        """Compare-and-set ``record``; on a lost race adopt the winner's. True if ours won."""
        record.by = self.instance
        record.at = self.clock()
        if self.store is None:
            self.apply(record, None)
            return True
        try:
            rev = await self.store.cas(self.target, record, self.revision)
            if rev is None:
                current, current_rev = await self.store.get(self.target)
                self.apply(current, current_rev)
                return False
        except Exception as exc:
            log.warning(
                "circuit store unavailable, using the local view",
                target=self.target,
                error=str(exc) or type(exc).__name__,
            )
            self.apply(record, self.revision)
            return True
        self.apply(record, rev)
        return True

    async def _open(self, reopen: bool = False) -> None:
        for _ in range(3):
            if not reopen and self.record.state is not CircuitState.CLOSED:
                return  # another instance opened it first
            until = self.clock() + self.breaker.open_s
            if await self._write(CircuitRecord(state=CircuitState.OPEN, until=until)):
                self.opened += 1
                log.warning("circuit opened", target=self.target, open_s=self.breaker.open_s)
                await self._pause(until)
                return
            if reopen:
                return  # the lease was lost meanwhile: the new owner decides

    async def on_result(self, success: bool, probe: bool) -> None:
        """Feed one attempt's outcome (``probe``: it was sent as the half-open probe)."""
        async with self._lock:
            state = self.record.state
            if probe:
                if state is not CircuitState.HALF_OPEN or self.record.probe != self.instance:
                    return  # the lease was lost meanwhile; the new owner decides
                if success:
                    if await self._write(CircuitRecord(state=CircuitState.CLOSED)):
                        log.info("circuit closed", target=self.target)
                else:
                    await self._open(reopen=True)
                return
            if state is not CircuitState.CLOSED:
                return  # a late answer to a request sent before the circuit opened
            if success:
                self.breaker.record_success()
            elif self.breaker.record_failure():
                await self._open()

    async def tick(self) -> None:
        """Take the probe lease when the open period is over, renew it while waiting."""
        async with self._lock:
            r = self.record
            now = self.clock()
            if r.state is CircuitState.OPEN and now >= r.until:
                await self._take_lease(r)
            elif r.state is CircuitState.HALF_OPEN:
                if r.probe == self.instance:
                    if not self.breaker.probe_out and r.lease_until - now < self._renew_margin:
                        renewed = CircuitRecord(
                            state=CircuitState.HALF_OPEN,
                            until=r.until,
                            probe=self.instance,
                            lease_until=now + self.lease_s,
                        )
                        await self._write(renewed)
                elif now >= r.lease_until:
                    await self._take_lease(r)

    async def _take_lease(self, r: CircuitRecord) -> None:
        lease = CircuitRecord(
            state=CircuitState.HALF_OPEN,
            until=r.until,
            probe=self.instance,
            lease_until=self.clock() + self.lease_s,
        )
        if await self._write(lease):
            log.info("circuit half-open: this instance sends the probe", target=self.target)
            await self._resume()

    async def forget(self) -> None:
        """The target is gone: drop its shared record."""
        with contextlib.suppress(KeyError):
            METRICS.circuit_state.remove(self.target)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.delete(self.target)
