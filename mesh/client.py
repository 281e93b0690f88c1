"""MeshClient: connect, publish, consume, request/reply, and manage the registry.

::

    async with MeshClient(settings) as mesh:
        event_id = await mesh.publish("shop", "order.created", {"id": 7})
        async for delivery in mesh.consume("billing"):
            handle(delivery.event)
            await delivery.ack()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors as nats_errors
import nats.js.errors as js_errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from mesh import envelope
from mesh.config import Settings, load_settings
from mesh.crypto import KeyRing
from mesh.envelope import Event
from mesh.errors import (
    BrokerError,
    BrokerUnavailable,
    Conflict,
    DecodeError,
    NotFound,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    ValidationError,
)
from mesh.netguard import check_literal
from mesh.observability import METRICS
from mesh.pubpipe import AckedPublisher, ack_duplicate, ack_error, no_stream
from mesh.pullfeed import PullFeed
from mesh.records import DeliveryRecord, Outcome, dead_letter_headers
from mesh.registry import Propagation, PropagationMode, Registry, Target, TargetKind
from mesh.routing import RouteCache, Verdict
from mesh.serverinfo import check_server
from mesh.streams import Provisioner, StreamNames, ensure_streams
from mesh.subjects import Subjects, qualify, validate_name, validate_source, validate_type

log = structlog.get_logger("mesh.client")

H_STATUS = "mesh-status"
# Consecutive failed fetches (not timeouts) before the pull subscription is re-created.
PULL_RESUBSCRIBE_AFTER = 5
PUBLISH_CHUNK = 64  # messages publish_many hands to the connection per loop turn

if TYPE_CHECKING:
    from mesh.tenants import ClientQuota


@dataclass
class Reply:
    """The answer to a request: an HTTP-like status and data."""

    status: int
    data: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class Delivery:
    """One event handed to a consumer; ack it once the work is durable."""

    event: Event
    msg: Msg
    target: str

    @property
    def attempt(self) -> int:
        return int(self.msg.metadata.num_delivered or 1)

    async def ack(self) -> None:
        await self.msg.ack_sync()

    async def nak(self, delay: float | None = None) -> None:
        await self.msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()

    async def term(self) -> None:
        await self.msg.term()


def raise_if_cancelled() -> None:
    """Raise CancelledError when this task was asked to stop, even if the request was lost.

    nats.py waits for messages through ``asyncio.wait_for``, which on Python 3.11 drops a
    cancellation that races with the awaited thing finishing (CPython gh-86296): a fetch
    cancelled just as its 408 "request timeout" arrives returns as a timeout. A loop that
    retries on timeouts would then run on, and the caller that cancelled it (``wait_for``
    around ``anext``, a service stopping) would wait for it forever. ``Task.cancelling()``
    still counts the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class MeshClient:
    """A connection to the mesh. Use as an async context manager."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        keyring: KeyRing | None = None,
        name: str = "mesh",
        reconnect_forever: bool = True,
    ) -> None:
        self.settings = settings or load_settings()
        self.subjects = Subjects(self.settings.prefix)
        self.names = StreamNames.for_prefix(self.settings.prefix)
        self._quota: ClientQuota | None = None
        self.name = name
        self._keyring = keyring
        self._reconnect_forever = reconnect_forever
        self.nc: NATS = NATS()
        self._acked = AckedPublisher(self.nc)
        self._js: JetStreamContext | None = None
        self._registry: Registry | None = None
        self._routes: RouteCache | None = None
        self.reconnects = 0
        self._closing = False
        self.connected_event = asyncio.Event()

    # Lifecycle ----------------------------------------------------------------

    @property
    def keyring(self) -> KeyRing:
        if self._keyring is None:
            self._keyring = KeyRing.load(self.settings.key_path)
        return self._keyring

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerError("not connected")
        return self._js

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise BrokerError("not connected")
        return self._registry

    @property
    def provisioner(self) -> Provisioner:
        return Provisioner(self.js, self.registry, self.settings)

    async def connect(self) -> MeshClient:
        last_error: list[str] = []

        async def on_error(exc: Exception) -> None:
            text = str(exc) or type(exc).__name__
            last_error.append(text.removeprefix("nats: ").strip("'"))
            log.debug("nats error", error=text)

        async def on_disconnect() -> None:
            self.connected_event.clear()
            if not self._closing:  # our own close is not news
                log.info("nats disconnected")

        async def on_reconnect() -> None:
            self.reconnects += 1
            self.connected_event.set()
            log.info(
                "nats reconnected",
                url=str(self.nc.connected_url.netloc if self.nc.connected_url else ""),
            )

        opts = self.settings.connect_options()
        try:
            # One budget for the whole first connect: a TLS failure can leave nats.py waiting.
            await asyncio.wait_for(
                self.nc.connect(
                    name=self.name,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    max_reconnect_attempts=-1 if self._reconnect_forever else 3,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats.py says int; float works
                    allow_reconnect=True,
                    **opts,
                ),
                timeout=self.settings.connect_timeout * 3 + 2,
            )
        except (nats_errors.NoServersError, OSError, TimeoutError) as exc:
            where = ", ".join(self.settings.servers)
            auth = [e for e in last_error if "authorization" in e.lower()]
            if auth:
                raise BrokerUnavailable(
                    f"cannot connect to NATS at {where}: {auth[0]} (check MESH_NATS_USER,"
                    " MESH_NATS_PASSWORD, MESH_NATS_TOKEN or MESH_NATS_CREDS)"
                ) from None
            if any("certificate" in e.lower() for e in last_error):
                raise BrokerUnavailable(
                    f"cannot connect to NATS at {where}: TLS certificate not trusted"
                    " (check MESH_NATS_TLS_CA)"
                ) from None
            raise BrokerUnavailable(
                f"cannot connect to NATS at {where}"
                f" ({last_error[-1] if last_error else type(exc).__name__}): is the broker running"
                " (`mesh up`) and MESH_NATS_URL right?"
            ) from None
        except nats_errors.Error as exc:
            msg = str(exc) or type(exc).__name__
            raise BrokerUnavailable(f"cannot connect to NATS: {msg}") from None
        self.connected_event.set()
        try:
            check_server(self.nc)  # before anything is created on a server that cannot carry it
        except BrokerError:
            await self.close()
            raise
        self._js = self.nc.jetstream(timeout=10)
        # A cluster that has just started may still be electing its JetStream leader:
        # services wait for it (up to 60 s); a CLI command gives up sooner.
        deadline = time.monotonic() + (60.0 if self._reconnect_forever else 10.0)
        while True:
            try:
                self._registry = await Registry.open(
                    self._js,
                    self._keyring_or_none(),
                    self.names.registry,
                    replicas=self.settings.stream_replicas,
                )
                break
            except nats_errors.NoRespondersError:
                await self.close()
                raise BrokerUnavailable(
                    "the NATS server has no JetStream (start it with -js)"
                ) from None
            except (js_errors.APIError, nats_errors.TimeoutError) as exc:
                if time.monotonic() < deadline and (
                    isinstance(exc, nats_errors.TimeoutError | js_errors.ServiceUnavailableError)
                ):
                    log.info("waiting for JetStream", error=str(exc) or type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                await self.close()
                raise BrokerError(f"cannot open the registry: {exc}") from None
        self._routes = RouteCache(self._registry)
        return self

    def _keyring_or_none(self) -> KeyRing | None:
        try:
            return self.keyring
        except Exception:
            if self.settings.encryption:
                raise
            return None

    async def init(self) -> dict[str, list[str]]:
        """Create or update streams, then reconcile every consumer."""
        await ensure_streams(self.js, self.settings)
        return await self.provisioner.reconcile_all()

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), 5)
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def __aenter__(self) -> MeshClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Registry (with live consumer reconciliation) ---------------------------

    async def add_target(self, target: Target, secret: str | None = None) -> Target:
        if target.kind == TargetKind.WEBHOOK and target.url:
            # Refused now, not dead-lettered event by event later.
            check_literal(target.url, self.settings.allow_private_targets)
        await ensure_streams(self.js, self.settings)
        target = await self.registry.add_target(target, secret)
        await self.provisioner.reconcile_target(target)
        return target

    async def remove_target(self, name: str) -> list[str]:
        removed = await self.registry.remove_target(name)
        await self.provisioner.reconcile_all()
        return removed

    async def add_propagation(
        self,
        mode: PropagationMode | str,
        source: str,
        targets: list[str] | None = None,
        types: str | None = None,
        *,
        filter: str | None = None,
        transform: str | None = None,
    ) -> Propagation:
        """Add a propagation; ``filter`` is CESQL, ``transform`` JMESPath (both checked now)."""
        await ensure_streams(self.js, self.settings)
        prop = await self.registry.add_propagation(
            PropagationMode(mode), source, targets, types, filter=filter, transform=transform
        )
        await self.provisioner.reconcile_all()
        return prop

    async def remove_propagation(self, prop_id: str) -> Propagation:
        prop = await self.registry.remove_propagation(prop_id)
        await self.provisioner.reconcile_all()
        return prop

    # Publishing ---------------------------------------------------------------

    def build(
        self,
        source: str,
        event_type: str,
        data: Any = None,
        *,
        id: str | None = None,
        subject: str | None = None,
        datacontenttype: str | None = None,
        cause: Event | None = None,
    ) -> Event:
        source = validate_source(qualify(self.settings.tenant, source))
        validate_type(event_type)
        event = Event(source=source, type=event_type, data=data, subject=subject)
        if datacontenttype:
            event.datacontenttype = datacontenttype
        elif isinstance(data, bytes | bytearray):
            event.datacontenttype = envelope.OCTETS
        if id is not None:
            if not id or len(id) > 128 or any(c.isspace() for c in id):
                raise ValidationError("an event id is 1-128 characters without spaces")
            event.id = id
        if cause is not None:
            event.origin = cause.effective_origin
            event.hops = cause.hops + 1
        return event

    def _message(self, event: Event, nats_subject: str) -> tuple[dict[str, str], bytes]:
        headers, body = envelope.encode(
            event, self.keyring if self.settings.encryption else None, self.settings.encryption
        )
        size = (
            len(body)
            + len(nats_subject)
            + sum(map(len, headers))
            + sum(map(len, headers.values()))
            + 4 * len(headers)
        )
        max_payload = self.nc.max_payload or 1024 * 1024
        if size > max_payload:
            raise PayloadTooLarge(size, max_payload)
        return headers, body

    async def publish(
        self,
        source: str,
        event_type: str,
        data: Any = None,
        *,
        id: str | None = None,
        subject: str | None = None,
        datacontenttype: str | None = None,
        cause: Event | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Publish one event durably; returns its id. Same id twice is stored once."""
        event = self.build(
            source,
            event_type,
            data,
            id=id,
            subject=subject,
            datacontenttype=datacontenttype,
            cause=cause,
        )
        await self.publish_event(event, timeout=timeout)
        return event.id

    async def _take_quota(self, n: int) -> None:
        """The events/s quota of a tenant's client (``MESH_TENANT``, not ``default``)."""
        if self.settings.tenant == "default":
            return
        if self._quota is None:
            from mesh.tenants import ClientQuota

            self._quota = ClientQuota(self.js, self.names.tenants, self.settings.tenant)
        await self._quota.take(n)

    async def publish_event(self, event: Event, *, timeout: float = 5.0) -> bool:
        """Publish a built event; returns False when JetStream saw it as a duplicate."""
        if event.hops > self.settings.max_hops:
            raise ValidationError(
                f"event {event.id} is over the hop limit ({event.hops} > {self.settings.max_hops})"
            )
        await self._take_quota(1)
        nats_subject = self.subjects.evt(event.source, event.type)
        headers, body = self._message(event, nats_subject)
        try:
            ack = await self._acked.publish(nats_subject, body, headers, timeout)
        except TimeoutError:
            raise BrokerError(f"publish of {event.id} timed out after {timeout}s") from None
        except nats_errors.MaxPayloadError:
            raise PayloadTooLarge(len(body), self.nc.max_payload) from None
        if no_stream(ack):
            raise BrokerError("no stream stores mesh events: run `mesh init` (or `mesh up`) first")
        error = ack_error(ack)
        if error is not None:
            raise BrokerError(f"publish of {event.id} refused: {error}")
        duplicate = ack_duplicate(ack)
        if not duplicate:
            METRICS.events_published.labels(event.source).inc()
        return not duplicate

    async def publish_many(
        self,
        events: list[Event],
        *,
        window: int = 1024,
        timeout: float = 10.0,
    ) -> int:
        """Pipelined publish of many events; returns how many were new (not duplicates).

        At most ``window`` acknowledgements are outstanding. Messages go to the connection
        in chunks without yielding in between, so one socket write carries a chunk (with
        a stall timeout, nats.py's ``publish_async`` yields, and so writes, per message).
        Raises ``BrokerError`` when the broker refuses a message or stops answering;
        everything published before that stays published.
        """
        await self._take_quota(len(events))
        window = max(1, window)
        chunk = min(PUBLISH_CHUNK, window)
        outstanding: deque[tuple[asyncio.Future[Any], str]] = deque()
        new: Counter[str] = Counter()
        js = self.js
        try:
            for start in range(0, len(events), chunk):
                messages = []
                for event in events[start : start + chunk]:
                    nats_subject = self.subjects.evt(event.source, event.type)
                    headers, body = self._message(event, nats_subject)
                    messages.append((nats_subject, headers, body, event.source))
                excess = len(outstanding) + len(messages) - window
                if excess > 0:
                    await self._collect(outstanding, excess, timeout, new)
                try:
                    async with asyncio.timeout(timeout):
                        for nats_subject, headers, body, source in messages:
                            fut = await js.publish_async(nats_subject, body, headers=headers)
                            outstanding.append((fut, source))
                except (TimeoutError, js_errors.TooManyStalledMsgsError):
                    raise BrokerError(f"publish stalled for {timeout}s") from None
                except nats_errors.MaxPayloadError:
                    raise PayloadTooLarge(len(body), self.nc.max_payload) from None
                await asyncio.sleep(0)  # the flusher writes this chunk in one go
            await self._collect(outstanding, len(outstanding), timeout, new)
        finally:
            for fut, _ in outstanding:  # after an error: no "exception never retrieved"
                fut.add_done_callback(_retrieve)
            for source, n in new.items():
                METRICS.events_published.labels(source).inc(n)
        return sum(new.values())

    @staticmethod
    async def _collect(
        outstanding: deque[tuple[asyncio.Future[Any], str]],
        n: int,
        timeout: float,
        new: Counter[str],
    ) -> None:
        """Wait for the oldest ``n`` acknowledgements; count the new events by source."""
        if n <= 0:
            return
        oldest = [outstanding.popleft() for _ in range(n)]
        _, late = await asyncio.wait([fut for fut, _ in oldest], timeout=timeout)
        error: BrokerError | None = None
        if late:
            error = BrokerError(f"{len(late)} publish acknowledgements timed out after {timeout}s")
        for fut, source in oldest:
            if error is not None:
                fut.add_done_callback(_retrieve)
                continue
            exc = fut.exception()
            if isinstance(exc, js_errors.NoStreamResponseError):
                error = BrokerError(
                    "no stream stores mesh events: run `mesh init` (or `mesh up`) first"
                )
            elif exc is not None:
                error = BrokerError(f"publish refused: {exc}")
            elif not fut.result().duplicate:
                new[source] += 1
        if error is not None:
            raise error

    # Consuming ----------------------------------------------------------------

    async def check_event(self, target: str, event: Event) -> str | None:
        """Why ``target`` must not get this event (None when it may); no transform runs."""
        verdict = await self.route_event(target, event, transform=False)
        return verdict.skip

    async def route_event(
        self, target: str, event: Event, *, size: int = 0, transform: bool = True
    ) -> Verdict:
        """The one route check (mesh/routing.py): skip, dead-letter, or deliver the
        returned event (its data reshaped by the transforms). ``size``: the encoded size."""
        if event.effective_origin == target:
            return Verdict(skip="loop: the event originated at this target")
        if event.hops > self.settings.max_hops:
            return Verdict(skip=f"hop limit: {event.hops} > {self.settings.max_hops}")
        assert self._routes is not None
        return await self._routes.verdict(target, event, size=size, transform=transform)

    async def record(self, rec: DeliveryRecord) -> None:
        """Publish a delivery-attempt record (best effort: a failure is logged, not raised)."""
        try:
            ack = await self._acked.publish(
                self.subjects.delivery(rec.target), rec.to_bytes(), {"Nats-Msg-Id": rec.id}, 5.0
            )
            error = ack_error(ack)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        if error is not None:
            log.warning("delivery record not published", target=rec.target, error=error)

    async def dead_letter(self, msg: Msg, target: str, error: str, attempts: int) -> None:
        """Copy a message to the DLQ with its reason. Raises if the DLQ did not take it."""
        headers = dead_letter_headers(msg.subject, msg.headers, target, error, attempts)
        await self.js.publish(self.subjects.dlq(target), msg.data, headers=headers, timeout=10)

    async def pull(
        self,
        consumer: str,
        *,
        batch: int = 10,
        expires: float = 2.0,
        stream: str | None = None,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[list[Msg], None]:
        """Fetch batches from a durable consumer forever, surviving broker restarts.

        Every fetch sends a fresh pull request, so a loop survives a server
        restart (nats.py #504 is a pull subscription that waits on a request the
        restarted server forgot). The subscription itself is kept across
        reconnects: nats.py re-subscribes its inbox, and a new inbox would strand
        whatever the server sends to a request made through the old one until
        ack_wait. It is re-created only when the consumer is gone or fetches keep
        failing.
        """
        stream = stream or self.names.events
        feed: PullFeed | None = None
        backoff = 0.1
        failures = 0
        try:
            while stop is None or not stop.is_set():
                if self.nc.is_closed:
                    return
                try:
                    if feed is None:
                        feed = await PullFeed(self.nc, stream, consumer).open()
                    msgs = await feed.fetch(batch, timeout=expires)
                    backoff = 0.1
                    failures = 0
                except (nats_errors.TimeoutError, TimeoutError):
                    raise_if_cancelled()
                    continue
                except nats_errors.ConnectionClosedError:
                    return
                except (nats_errors.Error, js_errors.Error, OSError) as exc:
                    log.debug("pull retry", consumer=consumer, error=str(exc) or type(exc).__name__)
                    failures += 1
                    gone = isinstance(
                        exc, js_errors.NotFoundError | js_errors.ServiceUnavailableError
                    )
                    if feed is not None and (gone or failures >= PULL_RESUBSCRIBE_AFTER):
                        await feed.close()
                        feed = None
                        failures = 0
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                if msgs:
                    yield msgs
        finally:
            # A closed generator (break, aclose) must not leave its inbox subscribed; what
            # arrived for it and was never handed out goes back (nak) at once.
            if feed is not None:
                await feed.close()

    async def consume(
        self,
        target: str,
        *,
        batch: int = 10,
        expires: float = 2.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[Delivery, None]:
        """Yield events for a target, at least once: ack each after handling it."""
        t = await self.registry.get_target(target)
        if self.settings.tenant not in ("default", t.tenant):
            raise NotFound(f"unknown target {target!r}")  # another tenant's: as if missing
        consumer = t.consumer
        try:
            await self.js.consumer_info(self.names.events, consumer)
        except js_errors.NotFoundError:
            await ensure_streams(self.js, self.settings)
            await self.provisioner.reconcile_target(t)
        unseen: list[Msg] = []
        try:
            async for msgs in self.pull(consumer, batch=batch, expires=expires, stop=stop):
                unseen = list(msgs)
                while unseen:
                    delivery = await self._admit(target, unseen.pop(0))
                    if delivery is not None:
                        yield delivery
        finally:
            # Fetched but never handed out (the caller stopped early): give them back now
            # rather than after ack_wait.
            for msg in unseen:
                with contextlib.suppress(Exception):
                    await msg.nak()

    def decode(self, msg: Msg, seq: int | None = None) -> Event:
        """The event in a message of the events stream, opened with this client's keys.

        ``seq`` defaults to the stream sequence in the message's JetStream metadata.
        Raises DecodeError.
        """
        if seq is None and msg.reply:
            with contextlib.suppress(Exception):  # not a JetStream delivery: no sequence
                seq = msg.metadata.sequence.stream if msg.metadata.sequence else None
        return envelope.decode(
            msg.subject,
            msg.headers,
            msg.data,
            self._keyring_or_none(),
            seq=seq,
            subjects=self.subjects,
        )

    async def _admit(self, target: str, msg: Msg) -> Delivery | None:
        """Decode and check one message; dead-letter or skip what must not be handed out."""
        try:
            event = self.decode(msg)
        except DecodeError as exc:
            attempts = int(msg.metadata.num_delivered or 1)
            await self.dead_letter(msg, target, f"undecodable: {exc}", attempts)
            await msg.ack_sync()
            return None
        verdict = await self.route_event(target, event, size=len(msg.data))
        if verdict.dead is not None:
            attempts = int(msg.metadata.num_delivered or 1)
            await self.dead_letter(msg, target, verdict.dead, attempts)
            await msg.ack_sync()
            await self.record(
                DeliveryRecord(
                    event_id=event.id,
                    target=target,
                    attempt=attempts,
                    outcome=Outcome.DEAD,
                    error=verdict.dead,
                    instance=self.name,
                )
            )
            return None
        if verdict.event is None:
            await self.record(
                DeliveryRecord(
                    event_id=event.id,
                    target=target,
                    attempt=0,
                    outcome=Outcome.SKIPPED,
                    error=verdict.skip,
                    instance=self.name,
                )
            )
            await msg.ack_sync()
            return None
        event = verdict.event
        return Delivery(event=event, msg=msg, target=target)

    # Request / reply ----------------------------------------------------------

    async def request(
        self,
        source: str,
        target: str,
        event_type: str,
        data: Any = None,
        *,
        timeout: float = 5.0,
    ) -> Reply:
        """Ask ``target`` and wait for its answer (needs a bidirectional propagation)."""
        validate_name(source, "source name")
        validate_name(target, "target name")
        await self.registry.get_target(target)
        if not await self.registry.can_request(source, target):
            raise Conflict(
                f"no bidirectional propagation between {source!r} and {target!r}:"
                f" run `mesh propagate bidirectional --source {source} --target {target}`"
            )
        event = self.build(source, event_type, data)
        nats_subject = self.subjects.rpc(target, event_type)
        headers, body = self._message(event, nats_subject)
        try:
            msg = await self.nc.request(nats_subject, body, timeout=timeout, headers=headers)
        except nats_errors.NoRespondersError:
            raise RequestError(f"no responder for target {target!r}") from None
        except (nats_errors.TimeoutError, TimeoutError):
            raise RequestTimeout(f"request to {target!r} timed out after {timeout}s") from None
        return self._read_reply(msg)

    def _read_reply(self, msg: Msg) -> Reply:
        headers = dict(msg.headers or {})
        try:
            status = int(headers.get(H_STATUS, "200"))
        except ValueError:
            status = 502
        body = envelope.open_body(headers, msg.data, self._keyring_or_none())
        ctype = headers.get("ce-datacontenttype", envelope.JSON if body[:1] in b"{[" else "")
        data: Any = envelope.decode_data(body, ctype) if ctype else body
        return Reply(status=status, data=data, headers=headers)

    def decode_request(self, msg: Msg) -> Event:
        headers = msg.headers or {}
        source = headers.get("ce-source", "")
        try:
            validate_name(source, "source name")
        except ValidationError:
            # Requests need to say who asks: a reply goes to a known source.
            raise DecodeError(f"a request needs a valid ce-source header, not {source!r}") from None
        event_type = msg.subject.split(".", len(self.subjects.prefix.split(".")) + 2)[-1]
        return envelope.decode(
            self.subjects.evt(source, event_type),
            headers,
            msg.data,
            self._keyring_or_none(),
            subjects=self.subjects,
        )

    async def reply(self, msg: Msg, data: Any = None, status: int = 200, source: str = "") -> None:
        if not msg.reply:
            return
        event = Event(source=source or "mesh", type="reply", data=data)
        if isinstance(data, bytes | bytearray):
            event.datacontenttype = envelope.OCTETS
        headers, body = envelope.encode(
            event, self.keyring if self.settings.encryption else None, self.settings.encryption
        )
        headers[H_STATUS] = str(status)
        await self.nc.publish(msg.reply, body, headers=headers)

    async def serve_requests(
        self, target: str, handler: Callable[[Event], Awaitable[Any]]
    ) -> Subscription:
        """Answer requests to ``target``: the handler's return value is the reply data.

        Return a ``Reply`` to choose the status; an exception answers 500.
        """
        validate_name(target, "target name")

        async def on_msg(msg: Msg) -> None:
            try:
                event = self.decode_request(msg)
            except DecodeError as exc:
                await self.reply(msg, {"error": str(exc)}, 400, target)
                return
            if event.source == target:
                await self.reply(msg, {"error": "a target cannot request itself"}, 400, target)
                return
            try:
                result = await handler(event)
            except Exception as exc:
                log.warning("request handler failed", target=target, error=type(exc).__name__)
                await self.reply(msg, {"error": type(exc).__name__}, 500, target)
                return
            if isinstance(result, Reply):
                await self.reply(msg, result.data, result.status, target)
            else:
                await self.reply(msg, result, 200, target)

        return await self.nc.subscribe(
            self.subjects.rpc_filter(target), queue=f"rpc-{target}", cb=on_msg
        )

    # Helpers ------------------------------------------------------------------

    async def dlq_depths(self) -> dict[str, int]:
        """Dead letters retained, per target."""
        info = await self.js.stream_info(self.names.dlq, subjects_filter=self.subjects.dlq_all)
        return {s.rsplit(".", 1)[-1]: int(n) for s, n in (info.state.subjects or {}).items()}

    async def queue_depth(self, target: Target) -> dict[str, Any]:
        """A target's queue: lag = pending (not yet delivered) + unacked (in flight)."""
        ci = await self.js.consumer_info(self.names.events, target.consumer)
        pending, unacked = int(ci.num_pending or 0), int(ci.num_ack_pending or 0)
        return {
            "lag": pending + unacked,
            "pending": pending,
            "unacked": unacked,
            "redelivered": int(ci.num_redelivered or 0),
            "paused": bool(getattr(ci, "paused", False)),
        }

    async def target_or_error(self, name: str) -> Target:
        try:
            return await self.registry.get_target(name)
        except NotFound:
            raise NotFound(f"unknown target {name!r} (see `mesh target list`)") from None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (asyncio logs unretrieved ones)."""
    if not fut.cancelled():
        fut.exception()
