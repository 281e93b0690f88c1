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
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import structlog

from mesh import envelope, rpc_spans, tracing
from mesh._nats.port import JetStreamPort
from mesh._nats.pubpipe import ack_duplicate, ack_error, no_stream
from mesh._nats.types import NATS, JetStreamContext, Msg, Subscription, js_errors, nats_errors
from mesh.config import Settings, load_settings
from mesh.connection import connect_nats, open_registry
from mesh.crypto import KeyRing
from mesh.delivery import Deliveries, Delivery
from mesh.envelope import Event
from mesh.errors import (
    BrokerError,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ValidationError,
)
from mesh.netguard import check_literal
from mesh.observability import METRICS
from mesh.ownership import take_client_quota, tenant_target
from mesh.publishing import Encoded, build_event, check_size
from mesh.registry import Propagation, PropagationMode, Registry, Target, TargetKind
from mesh.replies import (
    Reply,
    answer_request,
    decode_request,
    read_reply,
    reply_message,
    send_request,
)
from mesh.routing import RouteCache
from mesh.serverinfo import check_server
from mesh.streams import Provisioner, StreamNames, ensure_streams
from mesh.subjects import Subjects, qualify, validate_name

log = structlog.get_logger("mesh.client")


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
        self.name = name
        self._keyring = keyring
        self._reconnect_forever = reconnect_forever
        self.port = JetStreamPort()
        self.nc: NATS = self.port.nc  # the connection, for connect_nats and check_server
        self._registry: Registry | None = None
        # What services and operator commands do around a delivery; its route cache
        # comes with the registry, on connect.
        self.deliveries = Deliveries(
            self.port, self.subjects, self.names, self.settings, self.keyring_or_none, None, name
        )
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
        """nats.py's JetStream context, for the KV stores (``mesh._nats`` helpers)."""
        return self.port.js

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise BrokerError("not connected")
        return self._registry

    @property
    def provisioner(self) -> Provisioner:
        return Provisioner(self.port, self.registry, self.settings)

    async def connect(self) -> MeshClient:
        tracing.configure()  # OTEL_* env: off unless asked (a service named itself first)

        async def on_disconnect() -> None:
            self.connected_event.clear()
            if not self._closing:  # our own close is not news
                log.info("nats disconnected")

        async def on_reconnect() -> None:
            self.reconnects += 1
            self.connected_event.set()
            log.info(
                "nats reconnected",
                url=self.port.connected_host,
            )

        await connect_nats(
            self.nc,
            self.settings,
            self.name,
            reconnect_forever=self._reconnect_forever,
            on_disconnect=on_disconnect,
            on_reconnect=on_reconnect,
        )
        self.connected_event.set()
        try:
            check_server(self.port)  # before anything is created on a server that cannot carry it
        except BrokerError:
            await self.close()
            raise
        self.port.bind(timeout=10)
        # A cluster that has just started may still be electing its JetStream leader:
        # services wait for it (up to 60 s); a CLI command gives up sooner.
        self._registry = await open_registry(
            self.port,
            self.keyring_or_none,
            self.names.registry,
            replicas=self.settings.stream_replicas,
            wait_s=60.0 if self._reconnect_forever else 10.0,
            close=self.close,
        )
        self.deliveries.routes = RouteCache(self._registry)
        return self

    def keyring_or_none(self) -> KeyRing | None:
        """The key ring; None when encryption is off and none loads (raises when it is on)."""
        try:
            return self.keyring
        except Exception:
            if self.settings.encryption:
                raise
            return None

    async def init(self) -> dict[str, list[str]]:
        """Create or update streams, then reconcile every consumer."""
        await ensure_streams(self.port, self.settings)
        return await self.provisioner.reconcile_all()

    async def close(self) -> None:
        if self.port.is_closed:
            return
        self._closing = True
        await self.port.close()

    async def __aenter__(self) -> MeshClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Registry (with live consumer reconciliation) ---------------------------

    async def add_target(self, target: Target, secret: str | None = None) -> Target:
        if target.kind == TargetKind.WEBHOOK and target.url:
            # Refused now, not dead-lettered event by event later.
            check_literal(target.url, self.settings.allow_private_targets)
        await ensure_streams(self.port, self.settings)
        target = await self.registry.add_target(target, secret)
        await self.provisioner.reconcile_target(target)
        return target

    async def remove_target(self, name: str) -> list[str]:
        removed = await self.registry.remove_target((await self.target_or_error(name)).ref)
        await self.provisioner.reconcile_all()
        return removed

    async def add_propagation(
        self,
        mode: PropagationMode | str,
        source: str,
        targets: list[str] | None = None,
        types: str | None = None,
        **kw: Any,
    ) -> Propagation:
        """Add a propagation; kw: filter (CESQL), transform (JMESPath), tenant (MESH_TENANT's)."""
        await ensure_streams(self.port, self.settings)
        m, kw["tenant"] = PropagationMode(mode), kw.get("tenant") or self.settings.tenant
        prop = await self.registry.add_propagation(m, source, targets, types, **kw)
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
        """A new event, checked (``mesh.publishing.build_event``); ``cause`` makes it a
        consequence of another (same origin, one more hop)."""
        return build_event(
            qualify(self.settings.tenant, source),  # MESH_TENANT: that tenant's sources
            event_type,
            data,
            id=id,
            subject=subject,
            datacontenttype=datacontenttype,
            cause=cause,
        )

    def _message(self, event: Event, nats_subject: str) -> tuple[dict[str, str], bytes]:
        headers, body = envelope.encode(
            event, self.keyring if self.settings.encryption else None, self.settings.encryption
        )
        check_size(nats_subject, headers, body, self.port.max_payload)
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

    async def publish_event(self, event: Event, *, timeout: float = 5.0) -> bool:
        """Publish a built event; returns False when JetStream saw it as a duplicate."""
        if event.hops > self.settings.max_hops:
            raise ValidationError(
                f"event {event.id} is over the hop limit ({event.hops} > {self.settings.max_hops})"
            )
        await take_client_quota(self, 1)
        nats_subject = self.subjects.evt(event.source, event.type)
        if tracing.TRACER is not None:
            return await tracing.traced_publish(
                event, nats_subject, lambda: self._publish_one(event, nats_subject, timeout)
            )
        return await self._publish_one(event, nats_subject, timeout)

    async def _publish_one(self, event: Event, nats_subject: str, timeout: float) -> bool:
        headers, body = self._message(event, nats_subject)
        try:
            ack = await self.port.publish_acked(nats_subject, body, headers, timeout)
        except TimeoutError:
            raise BrokerError(f"publish of {event.id} timed out after {timeout}s") from None
        except nats_errors.MaxPayloadError:
            raise PayloadTooLarge(len(body), self.port.max_payload) from None
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

        At most ``window`` acknowledgements are outstanding (``mesh.publishing``).
        Raises ``BrokerError`` when the broker refuses a message or stops answering;
        everything published before that stays published.
        """
        await take_client_quota(self, len(events))

        def encode(event: Event) -> Encoded:
            nats_subject = self.subjects.evt(event.source, event.type)
            if tracing.TRACER is not None:
                tracing.end_span(tracing.publish_span(event, nats_subject))  # acks: in bulk
            headers, body = self._message(event, nats_subject)
            return nats_subject, headers, body, event.source

        return await self.port.publish_many(events, encode, window=window, timeout=timeout)

    # Consuming ----------------------------------------------------------------

    async def consume(
        self,
        target: str,
        *,
        batch: int = 10,
        expires: float = 2.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[Delivery, None]:
        """Yield events for a target, at least once: ack each after handling it."""
        t = await tenant_target(self.registry, target, self.settings.tenant, strict=False)
        consumer = t.consumer
        try:
            await self.port.consumer_info(self.names.events, consumer)
        except js_errors.NotFoundError:
            await ensure_streams(self.port, self.settings)
            await self.provisioner.reconcile_target(t)
        unseen: list[Msg] = []
        try:
            deliveries = self.deliveries
            async for msgs in deliveries.pull(consumer, batch=batch, expires=expires, stop=stop):
                unseen = list(msgs)
                while unseen:
                    delivery = await deliveries.admit(t.ref, unseen.pop(0))
                    if delivery is not None:
                        yield delivery
        finally:
            # Fetched but never handed out (the caller stopped early): give them back now
            # rather than after ack_wait.
            for msg in unseen:
                with contextlib.suppress(Exception):
                    await msg.nak()

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
        t = await tenant_target(self.registry, target, self.settings.tenant, strict=False)
        target = t.name
        if not await self.registry.can_request(source, target, t.tenant):
            raise Conflict(
                f"no bidirectional propagation between {source!r} and {target!r}:"
                f" run `mesh propagate bidirectional --source {source} --target {target}`"
            )
        event = self.build(source, event_type, data)
        nats_subject = self.subjects.rpc(t.ref, event_type)

        async def ask() -> Reply:
            headers, body = self._message(event, nats_subject)  # with the span's context
            msg = await send_request(self.port, nats_subject, headers, body, target, timeout)
            return read_reply(msg, self.keyring_or_none())

        if tracing.TRACER is not None:
            return await rpc_spans.traced_request(event, nats_subject, target, ask)
        return await ask()

    def decode_request(self, msg: Msg) -> Event:
        return decode_request(msg, self.subjects, self.keyring_or_none())

    async def reply(self, msg: Msg, data: Any = None, status: int = 200, source: str = "") -> None:
        if msg.reply:  # with the answering span's context, when tracing
            keyring = self.keyring if self.settings.encryption else None
            headers, body = reply_message(data, status, source, keyring, self.settings.encryption)
            await self.port.send(msg.reply, body, headers=headers)

    async def serve_requests(
        self, target: str, handler: Callable[[Event], Awaitable[Any]]
    ) -> Subscription:
        """Answer requests to ``target`` with the handler's return value (a ``Reply`` sets
        the status; an exception answers 500), inside a server span when tracing."""
        validate_name(target, "target name")
        ref = target  # MESH_TENANT's target: its reference, as ``request`` sends to it
        if self.settings.tenant != "default":
            with contextlib.suppress(NotFound):
                ref = (await tenant_target(self.registry, target, self.settings.tenant)).ref

        async def on_msg(msg: Msg) -> None:
            await answer_request(msg, target, handler, self.decode_request, self.reply)

        return await self.port.subscribe(
            self.subjects.rpc_filter(ref), queue=f"rpc-{ref}", cb=on_msg
        )

    # Helpers ------------------------------------------------------------------

    async def target_or_error(self, name: str) -> Target:
        """Target ``name`` (or reference ``~T.name``) as this client's tenant sees it."""
        try:
            return await tenant_target(self.registry, name, self.settings.tenant, strict=False)
        except NotFound:
            raise NotFound(f"unknown target {name!r} (see `mesh target list`)") from None
