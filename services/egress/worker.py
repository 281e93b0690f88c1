"""One webhook target inside the egress: its fetch loop, its deliveries, its circuit.

Flow of one fetched batch (one task, services/egress/batch.py)::

    fetch (only while the circuit lets this instance)  ->  decode  ->  route check
      -> clearance: circuit closed, or this instance's one half-open probe
      -> rate-limit token -> a target slot and an egress-wide slot -> the driver's send
         (what clears at once goes out together: concurrent POSTs for the webhook)
      -> settled (services/egress/outcomes.py): ack, nak(delay), or dead letter then ack;
         the chunk's records as one message, the acks once it is stored

The attempt number is the broker's delivery count (``num_delivered``), so retries survive
crashes: a retry is a delayed redelivery held by the broker, never an in-process sleep.
At most ``max_in_flight`` requests of a target are on the wire and one more batch is
fetched ahead, so memory stays flat whatever the backlog; an ordered target's consumer
allows one unacknowledged message, so it has one request out, in order. A rate-limited
target's worker holds no more than ``RATE_AHEAD_S`` of its rate share (at least two
messages): what it holds only waits for tokens, and instances sharing the target must
not take a burst from each other (one holding 48 events at 10/s while the other idles).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING, Any

from mesh._nats.types import Msg, js_errors
from mesh.observability import METRICS
from mesh.records import Outcome
from mesh.registry import Target, TargetKind
from mesh.resilience import (
    TARGET_BACKOFF,
    CircuitState,
    RateLimiter,
)
from mesh.signing import Signer
from mesh.streams import ensure_streams
from services.egress.batch import BatchDelivery
from services.egress.circuit import SharedCircuit
from services.egress.drivers import Driver, make_driver
from services.egress.gate import WAKE_S, CircuitGate
from services.egress.outcomes import Outcomes
from services.egress.pace import Pace
from services.egress.rpc import RequestResponder

if TYPE_CHECKING:
    from services.egress.shared import EgressShared

FETCH_EXPIRES_S = 2.0
# Idle pulls of all workers together, per second, at most (roughly): a waiting pull costs
# a request per window, and with thousands of targets 2 s windows were ~1,500 requests/s
# of nothing. The server answers a waiting pull as soon as a message arrives, so a longer
# window costs no latency; it delays noticing a pull lost to a server restart.
IDLE_PULLS_PER_S = 200.0
MAX_FETCH_WINDOW_S = 30.0
MAX_BATCH = 64
# A rate-limited worker holds at most this many seconds of its rate share (at least two
# messages, one being sent and one waiting for its token): a fetch takes milliseconds.
RATE_AHEAD_S = 0.1


class TargetWorker(BatchDelivery, CircuitGate, Outcomes):
    """Delivers one target's feed for one egress instance."""

    def __init__(self, egress: EgressShared, target: Target) -> None:
        self.egress = egress
        self.client = egress.client
        self.deliveries = egress.deliveries
        self.target = target
        self.name = target.ref  # its name; a tenant's: ~tenant.name (mesh/subjects.py)
        self.consumer = target.consumer
        self.stream = egress.client.names.events
        self.log = egress.log.bind(target=self.name)
        self.circuit = SharedCircuit(
            self.name,
            egress.instance,
            egress.circuits,
            threshold=target.circuit_threshold,
            open_s=target.circuit_open_s,
            timeout_s=target.timeout_s,
            pause=self._pause,
            resume=self._resume,
        )
        self.circuit.listeners.append(self._kick)
        self.halt = asyncio.Event()
        self.fetch_stop = asyncio.Event()
        self._changed = asyncio.Event()
        self.limiter: RateLimiter | None = None
        self.configure_rate()
        self.held = 0  # messages fetched and not yet finished
        self.window = egress.fetch_expires_s  # this worker's pull window (``_window``)
        self._fetch_at = 0  # the fetch loop waits for held <= this
        self.on_wire = 0  # requests in progress
        self.http_slots = asyncio.Semaphore(self._limit())
        self._slots_for = self._limit()
        self.pace = Pace(self._limit(), target.timeout_s)
        self.tasks: set[asyncio.Task[None]] = set()
        self.sending: set[asyncio.Task[None]] = set()
        self._held: dict[int, tuple[Msg, float]] = {}  # id(msg) -> (msg, last keep-alive)
        self.ack_wait = 30.0
        self._signer: Signer | None = None
        self._signer_until = 0.0
        self.counts = {"delivered": 0, "retried": 0, "dead": 0, "skipped": 0}
        self._m_attempts = METRICS.delivery_attempts.labels(self.name)
        self._m_latency = METRICS.delivery_latency.labels(self.name)
        self._m_e2e = METRICS.end_to_end_latency.labels(self.name)
        self._m_delivered = METRICS.deliveries.labels(self.name, Outcome.DELIVERED.value)
        self._m_retry = METRICS.deliveries.labels(self.name, Outcome.RETRY.value)
        self.main: asyncio.Task[None] | None = None
        self._bg: list[asyncio.Task[None]] = []
        self.rpc = RequestResponder(self)
        self.driver = self._make_driver(target)

    # Configuration ------------------------------------------------------------

    def start(self) -> None:
        self.main = self.egress.spawn(self.run(), f"egress-{self.name}")

    def update(self, target: Target) -> None:
        """A changed registry entry: new URL, secret, policy, limits... without a restart."""
        self.target = target
        self._signer = None
        self.circuit.configure(target.circuit_threshold, target.circuit_open_s, target.timeout_s)
        if self.driver.update(target):
            # A new URL or options: new sends use a new driver; the old one closes once
            # its sends are done (a close mid-send would fail them for nothing).
            old, self.driver = self.driver, self._make_driver(target)
            self.egress.spawn(_close_later(old, target.timeout_s), f"close-{self.name}")
        self.configure_rate()
        if self._limit() != self._slots_for:
            # New waiters use the new limit; requests already out finish under the old one.
            self.http_slots = asyncio.Semaphore(self._limit())
            self._slots_for = self._limit()
        self.pace.configure(self._limit(), target.timeout_s)
        self.fetch_stop.set()  # the batch size may have changed: re-plan the fetch
        self._kick()

    def _make_driver(self, target: Target) -> Driver:
        url = ""
        if target.kind != TargetKind.WEBHOOK:
            url = self.client.registry.destination_url(target)
        return make_driver(target, url, self.egress.http, self.signer)

    def configure_rate(self) -> None:
        rate = self.target.rate
        if rate is None:
            self.limiter = None
            return
        # N instances share the target's rate: each takes rate / N (see webhook_egress).
        share = rate / max(1, self.egress.instance_count())
        if self.limiter is None:
            self.limiter = RateLimiter(share)
        elif self.limiter.rate != share:
            self.limiter.set_rate(share)
            self._changed.set()  # what the worker may hold changed: re-plan the fetch

    def signer(self) -> Signer:
        now = time.time()
        if self._signer is None or now >= self._signer_until:
            target = self.target
            self._signer = Signer(self.client.registry.secrets_for(target))
            # Re-read when the old secret's grace period ends.
            expires = target.old_secret_expires
            self._signer_until = (
                expires.timestamp() if expires and expires.timestamp() > now else (now + 3600.0)
            )
        return self._signer

    # Fetching -----------------------------------------------------------------

    def _limit(self) -> int:
        return 1 if self.target.ordered else self.target.max_in_flight

    def _rate_hold(self) -> int | None:
        """At most this many messages held for a rate-limited target (None: no limit)."""
        if self.limiter is None:
            return None
        return max(2, math.ceil(self.limiter.rate * RATE_AHEAD_S))

    def _batch(self) -> int:
        """Messages per fetch. Unlimited: the whole ``limit`` (one chunk on the wire,
        the next batch fetched meanwhile; over ``MAX_BATCH``, equal parts of it); a
        rate-limited target: half its hold."""
        if self.target.ordered or self.circuit.state is CircuitState.HALF_OPEN:
            return 1
        hold = self._rate_hold()
        if hold is not None:
            return max(1, min(MAX_BATCH, min(self._limit(), hold) // 2))
        # A fetched batch costs the same whatever its size (the pull request, the record
        # message and its acknowledgement, the task, the writes): at 32 in flight,
        # batches of 32 instead of 16 cut the egress's own CPU per delivery by a quarter
        # (docs/PERFORMANCE.md, session 7).
        cap = max(1, self._limit())
        # Over MAX_BATCH, batches that divide the limit: a batch goes out whole once there
        # is room for all of it (``Pace.fits``), so 100 in flight is two batches of 50,
        # where batches of 64 would leave 36 places empty.
        return cap // math.ceil(cap / MAX_BATCH)

    def _fetch_below(self, batch: int) -> int:
        """Fetch the next batch once at most this many messages are held: ``limit`` on
        the wire plus one batch ahead, or a rate-limited target's hold less a batch."""
        hold = self._rate_hold()
        if hold is None:
            return self._limit()
        return max(0, min(self._limit(), hold - batch))

    def may_fetch(self) -> bool:
        if self.halt.is_set():
            return False
        state = self.circuit.state
        if state is CircuitState.CLOSED:
            return True
        # Half-open: only the lease holder, only for its one probe, only when it holds none.
        return (
            state is CircuitState.HALF_OPEN
            and self.circuit.lease_ok()
            and not self.circuit.probe_out
            and self.held == 0
        )

    def _kick(self) -> None:
        self._changed.set()
        if not self.may_fetch():
            self.fetch_stop.set()

    async def _wait_changed(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAKE_S):
                await self._changed.wait()

    async def run(self) -> None:
        self._bg = [
            asyncio.create_task(self._keepalive_loop(), name=f"keepalive-{self.name}"),
            asyncio.create_task(self._circuit_loop(), name=f"circuit-{self.name}"),
        ]
        try:
            await self._prepare()
            if self.target.kind == TargetKind.WEBHOOK:
                await self.rpc.start()  # request/reply is HTTP's alone
            while not self.halt.is_set():
                self._changed.clear()
                if not self.may_fetch():
                    await self._wait_changed()
                    continue
                await self._fetch_round()
        finally:
            for task in self._bg:
                task.cancel()
            for task in self._bg:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.tasks:  # sends still out (stop's deadline handles them)
                await asyncio.wait(set(self.tasks), timeout=self.target.timeout_s)
            await self.driver.close()

    async def _prepare(self) -> None:
        """Make sure the consumer exists; load the circuit's shared state."""
        backoff = TARGET_BACKOFF.first_s
        while not self.halt.is_set():
            try:
                try:
                    info = await self.client.port.consumer_info(self.stream, self.consumer)
                except js_errors.NotFoundError:
                    await ensure_streams(self.client.port, self.client.settings)
                    info = await self.client.provisioner.reconcile_target(self.target)
                self.ack_wait = float(info.config.ack_wait or 30.0)
                if self.circuit.store is not None:
                    record, revision = await self.circuit.store.get(self.name)
                    self.circuit.apply(record, revision)
                if self.circuit.state is CircuitState.CLOSED and info.paused:
                    await self._resume()  # paused by an open circuit whose record is gone
                return
            except Exception as exc:
                self.log.warning("target not ready, retrying", error=str(exc) or repr(exc))
                await asyncio.sleep(backoff)
                backoff = TARGET_BACKOFF.next(backoff)

    async def _fetch_round(self) -> None:
        batch = self._batch()
        self.fetch_stop.clear()
        if not self.may_fetch():
            return
        self.window = max(self.window, self._window())  # a hand-back waits out the longest
        pulls = self.deliveries.pull(
            self.consumer, batch=batch, expires=self._window(), stop=self.fetch_stop
        )
        async with contextlib.aclosing(pulls):
            async for msgs in pulls:
                if self.halt.is_set():
                    for msg in msgs:  # fetched as we stopped: straight back
                        await self._hand_back(msg)
                    return
                if msgs:
                    self._dispatch(msgs)
                await self._room(batch)
                if self.fetch_stop.is_set() or not self.may_fetch() or self._batch() != batch:
                    return

    def _window(self) -> float:
        """The pull window: the egress's, longer when many workers share the instance."""
        workers = sum(self.egress.tenant_slots.active.values())
        spread = min(MAX_FETCH_WINDOW_S, workers / IDLE_PULLS_PER_S)
        return max(self.egress.fetch_expires_s, spread)

    async def _room(self, batch: int) -> None:
        """Wait until the next batch fits: at most ``limit`` requests on the wire plus one
        batch fetched ahead, so a freed slot never waits for a fetch round trip (for a
        rate-limited target, at most its rate hold)."""
        while not self.halt.is_set():
            self._changed.clear()
            self._fetch_at = self._fetch_below(batch)
            if self.held <= self._fetch_at and not self._tenant_full():
                return
            await self._wait_changed()

    def _tenant_full(self) -> bool:
        """While tenants share the instance: this worker's tenant holds its whole share and
        this worker has messages waiting already. Fetching more would only queue them
        behind those (each a task and a keepalive), work the event loop does for every
        tenant; it fetches again once slots free up (or at the next wake)."""
        slots = self.egress.tenant_slots
        return self.held > 0 and len(slots.active) > 1 and slots.slot(self.target.tenant).locked()

    def _dispatch(self, msgs: list[Msg]) -> None:
        """One task delivers the whole fetched batch (services/egress/batch.py)."""
        self.held += len(msgs)
        task = asyncio.create_task(self._deliver_batch(msgs))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("delivery task failed", error=repr(task.exception()))

    # Background loops ---------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        """Messages waiting (circuit, rate limit) or in long requests stay ours."""
        while True:
            interval = max(1.0, self.ack_wait / 3)
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for key, (msg, since) in list(self._held.items()):
                if now - since >= interval and key in self._held:
                    self._held[key] = (msg, now)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    # Stopping -------------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Stop pulling; let requests on the wire finish within ``timeout``; nak the rest."""
        self.halt.set()
        self._kick()
        await self.rpc.stop()
        await asyncio.sleep(0)  # let just-dispatched tasks start, so a cancel reaches their handler
        for task in list(self.tasks - self.sending):
            task.cancel()  # still waiting for the circuit, a token or a slot: hand back now
        waiting: set[asyncio.Task[Any]] = set(self.tasks) | set(self.rpc.tasks)
        if self.main is not None:
            waiting.add(self.main)
        grace = min(0.5, timeout / 2)  # kept back to hand the stragglers back
        if waiting:
            await asyncio.wait(waiting, timeout=max(0.0, timeout - grace))
        for task in list(self.tasks) + list(self.rpc.tasks):
            task.cancel()  # past the deadline: cancelled requests are nak-ed
        leftovers: set[asyncio.Task[Any]] = set(self.tasks) | set(self.rpc.tasks)
        if leftovers:
            await asyncio.wait(leftovers, timeout=max(grace, 0.1))
        if self.main is not None and not self.main.done():
            self.main.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.main

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.target.kind.value,
            "state": self.circuit.state.value,
            "in_flight": self.on_wire,
            "pace": self.pace.limit,  # requests it may have on the wire now (pace.py)
            "held": self.held,
            "rate_share": self.limiter.rate if self.limiter is not None else None,
            **self.counts,
        }


async def _close_later(driver: Driver, after: float) -> None:
    await asyncio.sleep(after)
    await driver.close()
