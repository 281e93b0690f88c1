"""One bridge client: ``Session``.

A session owns three tasks: a producer (the feed's pull loop, or a tail reader
calling ``offer``), a writer draining the bounded send queue into the socket,
and a reader handling the client's acks, naks and publishes. Whoever notices the
end (client gone, slow client, drain) calls ``close_soon``; the close task stops
the producer, naks what is unacked, then closes the socket with a handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from mesh._nats.types import Msg, nats_errors
from mesh.errors import DecodeError, MeshError
from mesh.observability import METRICS
from mesh.records import DeliveryRecord, Outcome
from mesh.subjects import consumer_of
from mesh.tokens import TokenClaims
from services.bridge.frames import (
    CLOSE_ERROR,
    CLOSE_GOING_AWAY,
    CLOSE_SLOW,
    event_frame,
    to_json,
)
from services.bridge.publish import publish_frame

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.delivery import Deliveries
    from services.bridge.tail import TailReader

FEED = "feed"
TAIL = "tail"


@dataclass(frozen=True)
class BridgeOptions:
    host: str | None = None  # every interface: tokens guard the door; use TLS off-host
    send_queue: int = 256  # frames waiting for the socket, per connection
    max_in_flight: int = 64  # unacked feed frames per connection (capped by the consumer)
    batch: int = 16  # feed fetch size
    fetch_expires_s: float = 1.0
    ack_timeout_s: float = 20.0  # under the consumer's ack_wait (>= 30 s)
    slow_timeout_s: float = 5.0  # queue full / socket stalled this long: close 1013
    close_timeout_s: float = 2.0
    heartbeat_s: float = 20.0  # WebSocket ping
    tail_heartbeat_s: float = 5.0  # ordered consumer idle heartbeat: 2 missed -> re-created
    max_frame_bytes: int = 1024 * 1024


class Closing(Exception):
    """The connection is shutting down; unwind."""


@dataclass
class Spec:
    target: str
    claims: TokenClaims
    mode: str
    since_seq: int | None
    since_time: datetime | None
    filters: list[str]
    max_in_flight: int
    ack_timeout_s: float


@dataclass
class _Pending:
    msg: Msg
    event_id: str
    sent_at: float


@dataclass(frozen=True)
class BridgeShared:
    """What the bridge hands each session: the shared parts and the calls back it needs
    (never the ``Bridge`` itself, issue #15)."""

    client: MeshClient
    deliveries: Deliveries  # pull, decode, route check, records, dead letters
    options: BridgeOptions
    log: Any  # the bridge's bound structlog logger
    instance: str
    counts: dict[str, int]  # the bridge's counters, bumped by its sessions
    conns: set[Session]  # open sessions: a session adds itself while it runs
    close_if_revoked: Callable[[Session], bool]
    join_tail: Callable[[Session], Awaitable[TailReader]]
    leave_tail: Callable[[TailReader, Session], Awaitable[None]]


class Session:
    """One WebSocket client: a producer (feed pull or tail subscription), a writer, a reader."""

    def __init__(self, bridge: BridgeShared, request: web.Request, spec: Spec) -> None:
        self.bridge = bridge
        self.client = bridge.client
        self.deliveries = bridge.deliveries
        self.opts = bridge.options
        self.request = request
        self.spec = spec
        self.log = bridge.log.bind(target=spec.target, mode=spec.mode)
        self.ws = web.WebSocketResponse(
            heartbeat=self.opts.heartbeat_s,
            compress=False,
            max_msg_size=self.opts.max_frame_bytes,
            timeout=self.opts.close_timeout_s,
        )
        self.queue: asyncio.Queue[str] = asyncio.Queue(self.opts.send_queue)
        self.inflight: dict[int, _Pending] = {}
        self.stop = asyncio.Event()
        self.room = asyncio.Event()
        self.batch = min(self.opts.batch, spec.max_in_flight)
        self.tail: TailReader | None = None
        self.next_seq = 0  # tail: the lowest seq still to send
        self.tasks: list[asyncio.Task[Any]] = []
        self.reader: asyncio.Task[None] | None = None
        self.records: set[asyncio.Task[Any]] = set()
        self.closer: asyncio.Task[None] | None = None
        self.code = CLOSE_GOING_AWAY
        self.reason = ""

    # Main -------------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        if self.spec.mode == TAIL:
            # Joined before the upgrade: what is published once the client is in, it gets.
            try:
                self.tail = await self.bridge.join_tail(self)
            except (MeshError, nats_errors.Error, OSError, TimeoutError) as exc:
                self.log.warning("tail subscription failed", error=str(exc) or repr(exc))
                return web.json_response({"error": "cannot open the tail; try again"}, status=503)
        try:
            await self.ws.prepare(self.request)
        except Exception:
            await self._leave_tail()
            raise
        self.bridge.conns.add(self)
        self.bridge.counts["connections"] += 1
        METRICS.bridge_connections.inc()
        self.log.info("client connected", peer=self.request.remote, jti=self.spec.claims.jti)
        # Revoked between admission and now: the watch may have passed before we were in.
        self.bridge.close_if_revoked(self)
        self.tasks.append(asyncio.create_task(self._writer(), name="bridge-writer"))
        if self.spec.mode == FEED:
            self.tasks.append(asyncio.create_task(self._feed(), name="bridge-feed"))
            self.tasks.append(asyncio.create_task(self._watch_acks(), name="bridge-acks"))
        # The reader runs as a task so that a close started elsewhere can stop it first and
        # then close from here with a proper handshake (aiohttp drops the TCP connection
        # without one when close() races a pending receive()).
        self.reader = asyncio.create_task(self._read(), name="bridge-reader")
        try:
            await asyncio.wait([self.reader])
        finally:
            try:
                await asyncio.shield(self.close_soon(1000, ""))
            finally:
                self.bridge.conns.discard(self)
                METRICS.bridge_connections.dec()
                self.log.info("client disconnected", code=self.code, reason=self.reason)
        return self.ws

    async def _read(self) -> None:
        try:
            async for wsmsg in self.ws:
                if wsmsg.type == WSMsgType.TEXT:
                    self._count_in()
                    await self._on_text(wsmsg.data)
                elif wsmsg.type == WSMsgType.BINARY:
                    self._count_in()
                    await self.send({"error": "send JSON text frames"})
        except Closing:
            pass
        except (MeshError, nats_errors.Error, OSError) as exc:
            # An ack or publish the broker did not take: the client reconnects and retries.
            self.log.warning("broker error on the socket", error=str(exc) or type(exc).__name__)
            self.close_soon(CLOSE_ERROR, "broker unavailable; reconnect")
        except Exception as exc:
            self.log.error("reader failed", error=repr(exc))
            self.close_soon(CLOSE_ERROR, "internal error")

    def close_soon(self, code: int, reason: str) -> asyncio.Task[None]:
        """Start closing (once); returns the task that finishes it."""
        if self.closer is None:
            self.code, self.reason = code, reason
            self.closer = asyncio.create_task(self._shutdown(), name="bridge-close")
        return self.closer

    def slow(self, why: str) -> None:
        if self.closer is None:
            self.bridge.counts["slow_closes"] += 1
            METRICS.bridge_slow_closes.inc()
            self.log.warning("slow client closed", why=why, unacked=len(self.inflight))
        self.close_soon(CLOSE_SLOW, f"too slow: {why}")

    async def _shutdown(self) -> None:
        self.stop.set()
        self.room.set()
        # Unblock a producer waiting for queue space (a shared tail reader must not wait
        # out slow_timeout for a client that is leaving). Feed frames dropped here are in
        # flight and nak'ed below; a tail client resumes by sequence.
        while not self.queue.empty():
            self.queue.get_nowait()
        # 1. Stop producing: feed finishes its fetch (naking what it brings), tail unsubscribes.
        await self._leave_tail()
        producers = [t for t in self.tasks if t.get_name() == "bridge-feed"]
        if producers:
            # Let the fetch expire rather than cancel it: a pull request cut short can still
            # be handed messages, which then wait out the consumer's ack_wait.
            _, late = await asyncio.wait(producers, timeout=self.opts.fetch_expires_s * 2 + 2.0)
            for t in late:
                t.cancel()
        # 2. Hand back everything unacked, before the (possibly slow) close handshake.
        pending, self.inflight = list(self.inflight.values()), {}
        for p in pending:
            with contextlib.suppress(Exception):
                await p.msg.nak()
        if pending:
            self.log.info("unacked frames handed back", count=len(pending))
        # 3. Stop reading and writing, then close the socket.
        rest = [*self.tasks, *([self.reader] if self.reader else [])]
        for t in rest:
            if t is not asyncio.current_task():
                t.cancel()
        if rest:
            await asyncio.wait(rest)
        if self.ws.prepared and not self.ws.closed:
            try:
                async with asyncio.timeout(self.opts.close_timeout_s + 1.0):
                    # A close frame's reason is at most 123 bytes; cut on a character.
                    reason = self.reason.encode()[:120].decode(errors="ignore").encode()
                    await self.ws.close(code=self.code, message=reason)
            except (TimeoutError, Exception):
                if self.request.transport is not None:
                    self.request.transport.abort()
        if self.records:
            await asyncio.wait(self.records, timeout=5.0)

    # Sending ------------------------------------------------------------------

    async def send(self, doc: dict[str, Any]) -> None:
        await self.send_frame(to_json(doc))

    async def send_frame(self, frame: str) -> None:
        """Queue a frame; a queue that stays full for slow_timeout closes the client (1013)."""
        if self.stop.is_set():
            raise Closing
        try:
            self.queue.put_nowait(frame)
            return
        except asyncio.QueueFull:
            pass
        try:
            async with asyncio.timeout(self.opts.slow_timeout_s):
                await self.queue.put(frame)
        except TimeoutError:
            self.slow(f"send queue full for {self.opts.slow_timeout_s:g}s")
            raise Closing from None

    async def _writer(self) -> None:
        out = METRICS.bridge_frames.labels("out")
        queue, slow_s = self.queue, self.opts.slow_timeout_s
        while True:
            frames = [await queue.get()]
            # What is queued goes out under one deadline (one timer, not one per frame).
            while len(frames) < 64 and not queue.empty():
                frames.append(queue.get_nowait())
            try:
                async with asyncio.timeout(slow_s):
                    for frame in frames:
                        await self.ws.send_str(frame)
            except TimeoutError:
                self.slow(f"socket took no data for {slow_s:g}s")
                return
            except (ConnectionError, RuntimeError):
                self.close_soon(CLOSE_GOING_AWAY, "connection lost")
                return
            except Exception as exc:
                self.log.error("writer failed", error=repr(exc))
                self.close_soon(CLOSE_ERROR, "internal error")
                return
            self.bridge.counts["frames_out"] += len(frames)
            out.inc(len(frames))

    def _count_in(self) -> None:
        self.bridge.counts["frames_in"] += 1
        METRICS.bridge_frames.labels("in").inc()

    # Feed mode ----------------------------------------------------------------

    async def _feed(self) -> None:
        consumer = consumer_of(self.spec.target)
        # Closing the generator unsubscribes its fetch inbox.
        pull = self.deliveries.pull(
            consumer, batch=self.batch, expires=self.opts.fetch_expires_s, stop=self.stop
        )
        try:
            async with contextlib.aclosing(pull) as batches:
                async for msgs in batches:
                    await self._take(msgs)
                    limit = self.spec.max_in_flight - self.batch
                    while len(self.inflight) > limit and not self.stop.is_set():
                        self.room.clear()
                        await self.room.wait()
        except Closing:
            return
        except Exception as exc:
            self.log.error("feed failed", error=repr(exc))
            self.close_soon(CLOSE_ERROR, "internal error")

    async def _take(self, msgs: list[Msg]) -> None:
        """Frame each message; whatever this does not reach is nak'ed back."""
        i = 0
        try:
            while i < len(msgs) and not self.stop.is_set():
                msg = msgs[i]
                doc = await self._admit_msg(msg)
                i += 1
                if doc is None:
                    continue
                seq = int(doc["seq"])
                self.inflight.pop(seq, None)  # a redelivery replaces the older copy
                self.inflight[seq] = _Pending(msg, str(doc["id"]), time.monotonic())
                await self.send(doc)
        finally:
            for msg in msgs[i:]:
                with contextlib.suppress(Exception):
                    await msg.nak()

    async def _admit_msg(self, msg: Msg) -> dict[str, Any] | None:
        """Decode and check a feed message; ack (and record) what this target must not get."""
        seq = msg.metadata.sequence.stream
        target = self.spec.target
        try:
            event = self.deliveries.decode(msg, seq)
        except DecodeError as exc:
            attempts = int(msg.metadata.num_delivered or 1)
            try:
                await self.deliveries.dead_letter(msg, target, f"undecodable: {exc}", attempts)
            except Exception as dlq_exc:
                self.log.warning("dead letter failed", seq=seq, error=str(dlq_exc))
                await msg.nak(delay=5.0)
                return None
            with contextlib.suppress(Exception):
                await msg.ack_sync()  # not acked: it is dead-lettered again, which is harmless
            return None
        try:
            verdict = await self.deliveries.route_event(target, event, size=len(msg.data))
            if verdict.dead is not None:
                attempts = int(msg.metadata.num_delivered or 1)
                await self.deliveries.dead_letter(msg, target, verdict.dead, attempts)
                self._record(event.id, Outcome.DEAD, attempts, error=verdict.dead)
                await msg.ack_sync()
                return None
            if verdict.event is None:
                rec = self._rec(event.id, Outcome.SKIPPED, 0, error=verdict.skip)
                await self._settle_recorded(msg, rec)
                return None
            event = verdict.event
        except (MeshError, nats_errors.Error, OSError, TimeoutError) as exc:
            # The registry or the ack did not answer (broker blip): it comes back later.
            self.log.warning("route check failed", seq=seq, error=str(exc) or type(exc).__name__)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
            return None
        doc = event_frame(event, seq)
        doc["attempt"] = int(msg.metadata.num_delivered or 1)
        return doc

    async def _watch_acks(self) -> None:
        limit = self.spec.ack_timeout_s
        while not self.stop.is_set():
            await asyncio.sleep(min(1.0, limit / 4))
            if not self.inflight:
                continue
            oldest = next(iter(self.inflight.values()))
            if time.monotonic() - oldest.sent_at > limit:
                self.slow(f"no ack within {limit:g}s")
                return

    def _rec(
        self, event_id: str, outcome: Outcome, attempt: int, error: str | None = None
    ) -> DeliveryRecord:
        return DeliveryRecord(
            event_id=event_id,
            target=self.spec.target,
            attempt=attempt,
            outcome=outcome,
            error=error,
            instance=self.bridge.instance,
            tenant=self.spec.claims.tenant,
        )

    def _record(
        self, event_id: str, outcome: Outcome, attempt: int, error: str | None = None
    ) -> None:
        """A record of what is settled already (a dead letter, stored first)."""
        self._track(self.deliveries.record(self._rec(event_id, outcome, attempt, error)))

    def _track(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self.records.add(task)
        task.add_done_callback(self.records.discard)

    async def _settle_recorded(self, msg: Msg, rec: DeliveryRecord) -> None:
        """Ack ``msg`` once its record is stored, as the egress does; when the record
        cannot be stored, hand the message back: it comes again (a duplicate the client
        may see), never an acknowledged delivery without its record."""
        with contextlib.suppress(Exception):
            if await self.deliveries.record(rec):
                await msg.ack_sync()
            else:
                await msg.nak(delay=1.0)

    # Reading ------------------------------------------------------------------

    async def _on_text(self, text: str) -> None:
        try:
            doc = json.loads(text)
        except ValueError:
            await self.send({"error": "frames must be JSON objects"})
            return
        if not isinstance(doc, dict):
            await self.send({"error": "frames must be JSON objects"})
        elif "ack" in doc:
            await self._settle(doc["ack"], ack=True)
        elif "nak" in doc:
            await self._settle(doc["nak"], ack=False)
        elif "publish" in doc:
            await self.send(await publish_frame(self.client, self.spec.claims, doc["publish"]))
        else:
            await self.send({"error": "unknown frame: expected ack, nak or publish"})

    async def _settle(self, value: Any, *, ack: bool) -> None:
        if self.spec.mode == TAIL:
            return  # nothing to settle in a tail; harmless from a client written for feeds
        seqs = value if isinstance(value, list) else [value]
        unknown = []
        for s in seqs:
            if not isinstance(s, int) or isinstance(s, bool):
                await self.send({"error": "ack and nak take a seq or a list of seqs"})
                return
            p = self.inflight.pop(s, None)
            if p is None:
                unknown.append(s)
                continue
            if ack:  # the record first, then the ack (in the background: reading goes on)
                attempt = int(p.msg.metadata.num_delivered or 1)
                rec = self._rec(p.event_id, Outcome.DELIVERED, attempt)
                self._track(self._settle_recorded(p.msg, rec))
            else:
                await p.msg.nak()
        self.room.set()
        if unknown:
            await self.send({"error": "not in flight on this connection", "seqs": unknown[:20]})

    # Tail mode ----------------------------------------------------------------

    async def offer(self, seq: int, frame: str) -> None:
        """A tail frame from the reader; each seq at most once, in order."""
        if seq < self.next_seq or self.stop.is_set():
            return
        self.next_seq = seq + 1
        with contextlib.suppress(Closing):
            await self.send_frame(frame)

    async def _leave_tail(self) -> None:
        tail, self.tail = self.tail, None
        if tail is not None:
            await self.bridge.leave_tail(tail, self)
