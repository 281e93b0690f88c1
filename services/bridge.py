"""The streaming bridge: authenticated WebSocket feeds with resume and no loss.

``GET /v1/stream?target=T`` with ``Authorization: Bearer <token>`` (or
``&token=`` for browsers, which cannot set headers on a WebSocket). A refused
credential is an HTTP 401 with ``{"error": reason}`` before any upgrade.

Modes:

- ``feed`` (default): the target's durable ``deliver-T`` consumer, at least
  once. Every frame carries the stream sequence; the client answers
  ``{"ack": seq}`` (or a list of seqs). What it has not acked when it goes away
  is nak'ed back and comes again, to this or the next connection. At most
  ``max_in_flight`` unacked frames per connection.
- ``tail``: an ordered read of the target's filter subjects from
  ``since_seq=N`` (the first frame has seq >= N: resume with last seq + 1) or
  ``since_time=ISO``, or from now. Nothing to ack.

Frames out: ``{"seq", "id", "source", "type", "time", "data"}`` (feed adds
``attempt``); ``{"published": {...}}`` and ``{"error": ...}`` answer the
client. Frames in: ``{"ack": seq}``, ``{"nak": seq}``,
``{"publish": {"type", "data", "source"?, "id"?, "ref"?}}``.

Backpressure: frames go through a bounded queue to one writer. A client whose
queue stays full, whose socket stops taking data, or (feed) whose oldest frame
stays unacked too long is closed with 1013 (try again later); its unacked
frames are nak'ed first, so it loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import nats.errors as nats_errors
import nats.js.errors as js_errors
from aiohttp import WSMsgType, web
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from mesh import envelope
from mesh.config import Settings
from mesh.envelope import Event
from mesh.errors import ConfigError, DecodeError, MeshError, NotFound, PortInUse
from mesh.observability import METRICS
from mesh.records import DeliveryRecord, Outcome
from mesh.registry import TargetKind
from mesh.subjects import validate_name
from mesh.tokens import TokenClaims, TokenError, key_path, load_key, verify
from services.base import Service

PATH = "/v1/stream"
FEED = "feed"
TAIL = "tail"
CLOSE_SLOW = 1013  # try again later
CLOSE_GOING_AWAY = 1001
CLOSE_ERROR = 1011


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


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Closing(Exception):
    """The connection is shutting down; unwind."""


@dataclass
class _Spec:
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


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), default=str)


def event_frame(event: Event, seq: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "time": event.time.isoformat(),
        "data": event.json_data(),
    }


def _parse_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _Refused(400, f"since_time {text[:40]!r} is not an ISO 8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class Bridge(Service):
    name: ClassVar[str] = "bridge"

    def __init__(
        self,
        settings: Settings,
        *,
        instance: str | None = None,
        options: BridgeOptions | None = None,
    ) -> None:
        super().__init__(settings, instance=instance)
        self.options = options or BridgeOptions()
        self.port = settings.bridge_port
        self.scheme = "ws"
        self._key = b""
        self._runner: web.AppRunner | None = None
        self._conns: set[_Connection] = set()
        self._accepting = False
        self.counts = {"connections": 0, "frames_in": 0, "frames_out": 0, "slow_closes": 0}

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{PATH}"

    # Lifecycle ----------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        cert, key = self.settings.bridge_tls_cert, self.settings.bridge_tls_key
        if cert is None and key is None:
            return None
        if cert is None:
            raise ConfigError("MESH_BRIDGE_TLS_KEY is set without MESH_BRIDGE_TLS_CERT")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the bridge TLS certificate {cert}: {exc}") from None
        return ctx

    async def on_start(self) -> None:
        self._key = load_key(key_path(self.settings))
        ctx = self._ssl_context()
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.options.host, self.settings.bridge_port, ssl_context=ctx)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PortInUse(
                f"bridge cannot listen on port {self.settings.bridge_port}"
                f" ({exc.strerror or exc}): set MESH_BRIDGE_PORT"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.scheme = "wss" if ctx else "ws"
        self._accepting = True
        self.log.info("bridge listening", port=self.port, tls=ctx is not None)

    async def on_drain(self, timeout: float) -> None:
        self._accepting = False
        await self._close_all(CLOSE_GOING_AWAY, "bridge shutting down", timeout)

    async def on_close(self) -> None:
        self._accepting = False
        await self._close_all(CLOSE_GOING_AWAY, "bridge shutting down", 5.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close_all(self, code: int, reason: str, timeout: float) -> None:
        closers = [c.close_soon(code, reason) for c in list(self._conns)]
        if closers:
            await asyncio.wait(closers, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._conns), **self.counts}

    # Admission ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = await self._admit(request)
        except _Refused as r:
            headers = {}
            if r.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="mesh", error="invalid_token"'
            return web.json_response({"error": r.reason}, status=r.status, headers=headers)
        return await _Connection(self, request, spec).run()

    async def _admit(self, request: web.Request) -> _Spec:
        if not self._accepting:
            raise _Refused(503, "the bridge is shutting down")
        q = request.query
        target = q.get("target", "")
        if not target:
            raise _Refused(400, "missing ?target=")
        try:
            validate_name(target, "target name")
        except MeshError as exc:
            raise _Refused(400, str(exc)) from None
        claims = self._authenticate(request, target)
        mode = q.get("mode", FEED)
        if mode not in (FEED, TAIL):
            raise _Refused(400, f"unknown mode {mode[:20]!r}: use feed or tail")
        since_seq: int | None = None
        since_time: datetime | None = None
        if "since_seq" in q or "since_time" in q:
            if mode != TAIL:
                raise _Refused(400, "since_seq and since_time need mode=tail")
            if "since_seq" in q and "since_time" in q:
                raise _Refused(400, "give since_seq or since_time, not both")
        if "since_seq" in q:
            try:
                since_seq = int(q["since_seq"])
            except ValueError:
                since_seq = 0
            if since_seq < 1:
                raise _Refused(400, "since_seq must be a stream sequence >= 1")
        if "since_time" in q:
            since_time = _parse_time(q["since_time"])
        client = self.client
        try:
            t = await client.registry.get_target(target)
            if mode == FEED and t.kind == TargetKind.WEBHOOK:
                raise _Refused(
                    409, f"target {target!r} is a webhook target: its feed belongs to the egress"
                )
            try:
                info = await client.js.consumer_info(client.names.events, t.consumer)
            except js_errors.NotFoundError:
                info = await client.provisioner.reconcile_target(t)
        except NotFound:
            raise _Refused(404, f"unknown target {target!r}") from None
        except (MeshError, js_errors.Error, OSError, TimeoutError) as exc:
            self.log.warning("admission failed", target=target, error=str(exc))
            raise _Refused(503, "the broker is not reachable; try again") from None
        if not web.WebSocketResponse().can_prepare(request):
            raise _Refused(426, "this endpoint speaks WebSocket only")
        cap = info.config.max_ack_pending or self.options.max_in_flight
        # Close a non-acking client well before the consumer would redeliver behind its back.
        ack_wait = info.config.ack_wait or self.options.ack_timeout_s * 2
        return _Spec(
            target=target,
            claims=claims,
            mode=mode,
            since_seq=since_seq,
            since_time=since_time,
            filters=list(info.config.filter_subjects or [info.config.filter_subject or ""]),
            max_in_flight=max(1, min(self.options.max_in_flight, cap)),
            ack_timeout_s=min(self.options.ack_timeout_s, ack_wait * 2 / 3),
        )

    def _authenticate(self, request: web.Request, target: str) -> TokenClaims:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise _Refused(401, "unsupported Authorization: use 'Bearer <token>'")
            token = value.strip()
        else:
            token = request.query.get("token", "")
        if not token:
            raise _Refused(401, "missing credentials: send 'Authorization: Bearer <token>'")
        try:
            return verify(self._key, token, target)
        except TokenError as exc:
            raise _Refused(401, str(exc)) from None


class _Connection:
    """One WebSocket client: a producer (feed pull or tail subscription), a writer, a reader."""

    def __init__(self, bridge: Bridge, request: web.Request, spec: _Spec) -> None:
        self.bridge = bridge
        self.client = bridge.client
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
        self.tail_sub: Any = None
        self.next_seq = 1
        self.tasks: list[asyncio.Task[Any]] = []
        self.reader: asyncio.Task[None] | None = None
        self.records: set[asyncio.Task[Any]] = set()
        self.closer: asyncio.Task[None] | None = None
        self.code = CLOSE_GOING_AWAY
        self.reason = ""

    # Main -------------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        if self.spec.mode == TAIL:
            # Subscribed before the upgrade: what is published once the client is in, it gets.
            try:
                await self._subscribe_tail()
            except (MeshError, js_errors.Error, OSError, TimeoutError) as exc:
                self.log.warning("tail subscription failed", error=str(exc))
                return web.json_response({"error": "cannot open the tail; try again"}, status=503)
        try:
            await self.ws.prepare(self.request)
        except Exception:
            await self._unsubscribe_tail()
            raise
        self.bridge._conns.add(self)
        self.bridge.counts["connections"] += 1
        METRICS.bridge_connections.inc()
        self.log.info("client connected", peer=self.request.remote)
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
                self.bridge._conns.discard(self)
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
        except _Closing:
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
        # 1. Stop producing: feed finishes its fetch (naking what it brings), tail unsubscribes.
        await self._unsubscribe_tail()
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
                    await self.ws.close(code=self.code, message=self.reason.encode()[:120])
            except (TimeoutError, Exception):
                if self.request.transport is not None:
                    self.request.transport.abort()
        if self.records:
            await asyncio.wait(self.records, timeout=5.0)

    # Sending ------------------------------------------------------------------

    async def send(self, doc: dict[str, Any]) -> None:
        if self.stop.is_set():
            raise _Closing
        frame = _json(doc)
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
            raise _Closing from None

    async def _writer(self) -> None:
        out = METRICS.bridge_frames.labels("out")
        while True:
            frame = await self.queue.get()
            try:
                async with asyncio.timeout(self.opts.slow_timeout_s):
                    await self.ws.send_str(frame)
            except TimeoutError:
                self.slow(f"socket took no data for {self.opts.slow_timeout_s:g}s")
                return
            except (ConnectionError, RuntimeError):
                self.close_soon(CLOSE_GOING_AWAY, "connection lost")
                return
            except Exception as exc:
                self.log.error("writer failed", error=repr(exc))
                self.close_soon(CLOSE_ERROR, "internal error")
                return
            self.bridge.counts["frames_out"] += 1
            out.inc()

    def _count_in(self) -> None:
        self.bridge.counts["frames_in"] += 1
        METRICS.bridge_frames.labels("in").inc()

    # Feed mode ----------------------------------------------------------------

    async def _feed(self) -> None:
        consumer = f"deliver-{self.spec.target}"
        # Closing the generator unsubscribes its fetch inbox.
        pull = self.client.pull(
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
        except _Closing:
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
            event = envelope.decode(
                msg.subject,
                msg.headers,
                msg.data,
                self.client._keyring_or_none(),
                seq=seq,
                subjects=self.client.subjects,
            )
        except DecodeError as exc:
            attempts = int(msg.metadata.num_delivered or 1)
            try:
                await self.client.dead_letter(msg, target, f"undecodable: {exc}", attempts)
            except Exception as dlq_exc:
                self.log.warning("dead letter failed", seq=seq, error=str(dlq_exc))
                await msg.nak(delay=5.0)
                return None
            with contextlib.suppress(Exception):
                await msg.ack_sync()  # not acked: it is dead-lettered again, which is harmless
            return None
        try:
            reason = await self.client.check_event(target, event)
            if reason is not None:
                self._record(event.id, Outcome.SKIPPED, 0, error=reason)
                await msg.ack_sync()
                return None
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

    def _record(
        self, event_id: str, outcome: Outcome, attempt: int, error: str | None = None
    ) -> None:
        rec = DeliveryRecord(
            event_id=event_id,
            target=self.spec.target,
            attempt=attempt,
            outcome=outcome,
            error=error,
            instance=self.bridge.instance,
        )
        task = asyncio.create_task(self.client.record(rec))
        self.records.add(task)
        task.add_done_callback(self.records.discard)

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
            await self._publish(doc["publish"])
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
            if ack:
                await p.msg.ack()
                self._record(p.event_id, Outcome.DELIVERED, int(p.msg.metadata.num_delivered or 1))
            else:
                await p.msg.nak()
        self.room.set()
        if unknown:
            await self.send({"error": "not in flight on this connection", "seqs": unknown[:20]})

    async def _publish(self, req: Any) -> None:
        if not isinstance(req, dict):
            await self.send({"error": "publish takes an object", "refused": "publish"})
            return
        claims = self.spec.claims
        ref = req.get("ref")
        source = req.get("source") or (claims.publish_as[0] if claims.publish_as else "")
        answer: dict[str, Any] = {"refused": "publish"}
        if ref is not None:
            answer["ref"] = ref
        if not isinstance(source, str) or not claims.may_publish_as(source):
            answer["error"] = f"this token may not publish as {source!r}"
            await self.send(answer)
            return
        event_type, event_id = req.get("type"), req.get("id")
        if not isinstance(event_type, str) or (
            event_id is not None and not isinstance(event_id, str)
        ):
            answer["error"] = "publish needs a string type (and an optional string id)"
            await self.send(answer)
            return
        try:
            event = self.client.build(
                source, event_type, req.get("data"), id=event_id, datacontenttype=envelope.JSON
            )
            new = await self.client.publish_event(event)
        except MeshError as exc:
            answer["error"] = str(exc)
            await self.send(answer)
            return
        reply: dict[str, Any] = {"published": {"id": event.id, "duplicate": not new}}
        if ref is not None:
            reply["ref"] = ref
        await self.send(reply)

    # Tail mode ----------------------------------------------------------------

    async def _tail_start(self) -> int:
        """The first stream sequence the tail may deliver."""
        spec, js, stream = self.spec, self.client.js, self.client.names.events
        if spec.since_seq is not None:
            return spec.since_seq
        if spec.since_time is not None:
            when = spec.since_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
            try:
                # nats.py's get_msg has no start_time; the server API does (2.11+).
                resp = await js._api_request(
                    f"{js._prefix}.STREAM.MSG.GET.{stream}",
                    json.dumps({"start_time": when}).encode(),
                    timeout=5,
                )
                return int(resp["message"]["seq"])
            except js_errors.NotFoundError:
                pass  # nothing at or after that time: from the next event on
        info = await js.stream_info(stream)
        return int(info.state.last_seq) + 1

    async def _subscribe_tail(self) -> None:
        # Always by start sequence: nats.py re-creates an ordered consumer after a gap or a
        # broker restart from its last seen sequence, keeping the rest of this config.
        self.next_seq = await self._tail_start()
        cfg = ConsumerConfig(
            filter_subjects=self.spec.filters,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            mem_storage=True,
        )
        self.tail_sub = await self.client.js.subscribe(
            self.spec.filters[0],
            stream=self.client.names.events,
            config=cfg,
            ordered_consumer=True,
            idle_heartbeat=self.opts.tail_heartbeat_s,
            cb=self._on_tail_msg,
        )

    async def _unsubscribe_tail(self) -> None:
        sub, self.tail_sub = self.tail_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_tail_msg(self, msg: Msg) -> None:
        if self.stop.is_set():
            return
        seq = msg.metadata.sequence.stream
        if seq < self.next_seq:
            # A re-created ordered consumer that had seen nothing restarts at 1: skip what
            # this client has had or did not ask for. No repeats, whatever nats.py does.
            return
        self.next_seq = seq + 1
        try:
            event = envelope.decode(
                msg.subject,
                msg.headers,
                msg.data,
                self.client._keyring_or_none(),
                seq=seq,
                subjects=self.client.subjects,
            )
            if await self.client.check_event(self.spec.target, event) is not None:
                return
            await self.send(event_frame(event, seq))
        except DecodeError as exc:
            self.log.warning("undecodable event skipped in tail", seq=seq, error=str(exc))
        except _Closing:
            pass
        except Exception as exc:
            self.log.error("tail failed", error=repr(exc))
            self.close_soon(CLOSE_ERROR, "internal error")
