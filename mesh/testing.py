"""Test a program's handlers without a NATS server: ``TestMesh`` and ``MemoryPort``.

::

    from mesh.testing import TestMesh

    async def test_billing() -> None:
        async with TestMesh() as mesh:
            await mesh.add_target("billing")
            await mesh.add_propagation("unidirectional", "shop", ["billing"])
            await mesh.publish("shop", "order.created", {"id": 7})
            async for delivery in mesh.consume("billing"):
                assert delivery.event.data == {"id": 7}
                await delivery.ack()
                break

``TestMesh`` is a ``MeshClient`` whose port (``mesh.port.Port``) is a ``MemoryPort``:
publishing builds, checks and encodes events as on a server (ids, duplicates by id,
the hop limit, the size limit); a target's queue holds what its propagations route to
it (the same routing as the registry's), and a delivery is acked, nakked (it comes
again, attempt + 1) or terminated as on a server. Not simulated: CESQL filters and
transforms (refused when given), request/reply, redelivery after an ack wait, the
admin calls (DLQ, depths, replay). Those need a server: ``tests/`` run one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.crypto import KeyRing
from mesh.delivery import Deliveries, Delivery
from mesh.envelope import H_MSG_ID, Event
from mesh.errors import BrokerError, NotFound, ValidationError
from mesh.publishing import Encoded
from mesh.registry import Propagation, PropagationMode, Target, TargetKind, compute_routes
from mesh.routing import Verdict
from mesh.streams import filters_for

MEMORY_MAX_PAYLOAD = 1024 * 1024


def subject_matches_filter(subject: str, pattern: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest (one token or more)."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, w in enumerate(wanted):
        if w == ">":
            return len(tokens) > i
        if i >= len(tokens) or (w != "*" and w != tokens[i]):
            return False
    return len(tokens) == len(wanted)


@dataclass
class _Sequence:
    stream: int
    consumer: int = 0


@dataclass
class _Metadata:
    sequence: _Sequence
    num_delivered: int
    timestamp: datetime
    num_pending: int = 0


@dataclass
class _Stored:
    seq: int
    subject: str
    headers: dict[str, str] | None
    data: bytes
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


class MemoryMessage:
    """One delivery of a stored message to a consumer (a ``mesh.port.Message``)."""

    def __init__(self, consumer: _Consumer, stored: _Stored, attempt: int) -> None:
        self._consumer = consumer
        self._stored = stored
        self.subject = stored.subject
        self.data = stored.data
        self.reply = f"$JS.ACK.memory.{consumer.name}.{stored.seq}.{attempt}"
        self._headers = stored.headers
        self._metadata = _Metadata(_Sequence(stored.seq), attempt, stored.at)
        self.settled: str | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        return self._headers

    @property
    def metadata(self) -> _Metadata:
        return self._metadata

    def _settle(self, how: str) -> bool:
        if self.settled is not None:
            return False
        self.settled = how
        self._consumer.unacked.pop(self._stored.seq, None)
        return True

    async def ack(self) -> None:
        self._settle("ack")

    async def ack_sync(self, timeout: float = 1.0) -> MemoryMessage:
        self._settle("ack")
        return self

    async def nak(self, delay: float | None = None) -> None:
        if self._settle("nak"):
            self._consumer.redeliver(self._stored, self._metadata.num_delivered, delay)

    async def in_progress(self) -> None:
        return None

    async def term(self) -> None:
        self._settle("term")


class _Consumer:
    def __init__(self, name: str, filters: list[str]) -> None:
        self.name = name
        self.filters = filters
        self.queue: asyncio.Queue[tuple[_Stored, int]] = asyncio.Queue()
        self.unacked: dict[int, MemoryMessage] = {}

    def wants(self, subject: str) -> bool:
        return any(subject_matches_filter(subject, f) for f in self.filters)

    def redeliver(self, stored: _Stored, attempts: int, delay: float | None) -> None:
        if delay:
            loop = asyncio.get_running_loop()
            loop.call_later(delay, self.queue.put_nowait, (stored, attempts + 1))
        else:
            self.queue.put_nowait((stored, attempts + 1))


class _Ack:
    """A stream's answer to a publish, as ``mesh._nats.pubpipe`` reads it."""

    headers: dict[str, str] | None = None

    def __init__(self, stream: str, seq: int, duplicate: bool) -> None:
        doc: dict[str, Any] = {"stream": stream, "seq": seq}
        if duplicate:
            doc["duplicate"] = True
        self.data = json.dumps(doc, separators=(",", ":")).encode()
        self.duplicate = duplicate
        self.seq = seq


class MemoryPort:
    """A ``mesh.port.Port`` over one in-memory stream per subject space."""

    def __init__(self, stream: str = "MEMORY", max_payload: int = MEMORY_MAX_PAYLOAD) -> None:
        self.stream = stream
        self._max_payload = max_payload
        self.messages: list[_Stored] = []
        self._ids: dict[str, int] = {}
        self.consumers: dict[str, _Consumer] = {}
        self.closed = False

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def is_closed(self) -> bool:
        return self.closed

    def ensure_consumer(self, name: str, filters: list[str]) -> None:
        """Create the consumer (it gets what is stored from now on), or change its filters."""
        if name in self.consumers:
            self.consumers[name].filters = filters
        else:
            self.consumers[name] = _Consumer(name, filters)

    def _store(self, subject: str, body: bytes, headers: dict[str, str] | None) -> _Ack:
        if self.closed:
            raise BrokerError("the memory port is closed")
        msg_id = (headers or {}).get(H_MSG_ID)
        if msg_id is not None and msg_id in self._ids:
            return _Ack(self.stream, self._ids[msg_id], duplicate=True)
        stored = _Stored(len(self.messages) + 1, subject, dict(headers or {}), bytes(body))
        self.messages.append(stored)
        if msg_id is not None:
            self._ids[msg_id] = stored.seq
        for consumer in self.consumers.values():
            if consumer.wants(subject):
                consumer.queue.put_nowait((stored, 1))
        return _Ack(self.stream, stored.seq, duplicate=False)

    async def publish_acked(
        self, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
    ) -> _Ack:
        return self._store(subject, body, headers)

    async def publish(
        self,
        subject: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> _Ack:
        return self._store(subject, body, headers)

    async def publish_many(
        self,
        events: list[Event],
        encode: Callable[[Event], Encoded],
        *,
        window: int = 1024,
        timeout: float = 10.0,
    ) -> int:
        new = 0
        for event in events:
            subject, headers, body, _source = encode(event)
            new += not self._store(subject, body, headers).duplicate
        return new

    async def pull(
        self,
        stream: str,
        consumer: str,
        *,
        batch: int = 10,
        expires: float = 2.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[list[Any], None]:
        found = self.consumers.get(consumer)
        if found is None:
            raise NotFound(f"no consumer {consumer!r} in memory")
        while not self.closed and (stop is None or not stop.is_set()):
            try:
                first = await asyncio.wait_for(found.queue.get(), expires)
            except TimeoutError:
                continue
            items = [first]
            while len(items) < batch and not found.queue.empty():
                items.append(found.queue.get_nowait())
            msgs = []
            for stored, attempt in items:
                msg = MemoryMessage(found, stored, attempt)
                found.unacked[stored.seq] = msg
                msgs.append(msg)
            yield msgs

    async def close(self) -> None:
        self.closed = True

    def __getattr__(self, name: str) -> Any:
        raise BrokerError(f"{name} needs a NATS server: mesh.testing does not simulate it")


class MemoryDeliveries(Deliveries):
    """``Deliveries`` on a ``MemoryPort``: records and dead letters are kept in the
    ``TestMesh``'s lists; the route check is the loop and hop checks only (no registry)."""

    def __init__(self, mesh: TestMesh) -> None:
        port: Any = mesh.memory  # a Port, not a JetStreamPort
        super().__init__(
            port, mesh.subjects, mesh.names, mesh.settings, mesh.keyring_or_none, None, mesh.name
        )
        self.records = mesh.records
        self.dead_letters = mesh.dead_letters

    async def by_rules(self, target: str, event: Event, size: int, transform: bool) -> Verdict:
        return Verdict(event=event)  # routing is the consumers' filters; no CESQL here

    async def record(self, rec: Any) -> bool:
        self.records.append(rec)
        return True

    async def dead_letter(self, msg: Any, target: str, error: str, attempts: int) -> None:
        self.dead_letters.append((target, error))


class TestMesh(MeshClient):
    """A ``MeshClient`` on a ``MemoryPort`` (see the module doc)."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        keyring: KeyRing | None = None,
        name: str = "mesh-test",
    ) -> None:
        if settings is None:
            settings = Settings(encryption=keyring is not None)
        super().__init__(settings, keyring=keyring, name=name, reconnect_forever=False)
        self.memory = MemoryPort(self.names.events)
        self.port = self.memory  # type: ignore[assignment]  # a Port, not a JetStreamPort
        self.targets: dict[str, Target] = {}
        self.propagations: list[Propagation] = []
        self.records: list[Any] = []
        self.dead_letters: list[tuple[str, str]] = []  # (target, why)
        self.deliveries = MemoryDeliveries(self)

    async def connect(self) -> TestMesh:
        self.connected_event.set()
        return self

    async def close(self) -> None:
        await self.memory.close()

    async def __aenter__(self) -> TestMesh:
        return await self.connect()

    # Registry, in memory ------------------------------------------------------------

    async def add_target(self, target: Target | str, secret: str | None = None) -> Target:
        if isinstance(target, str):
            target = Target(name=target, kind=TargetKind.NATS)
        self.targets[target.name] = target
        self._reconcile()
        return target

    async def remove_target(self, name: str) -> list[str]:
        if self.targets.pop(name, None) is None:
            raise NotFound(f"unknown target {name!r}")
        self.memory.consumers.pop(f"deliver-{name}", None)
        return [name]

    async def add_propagation(
        self,
        mode: PropagationMode | str,
        source: str,
        targets: list[str] | None = None,
        types: str | None = None,
        **kw: Any,
    ) -> Propagation:
        if kw.get("filter") or kw.get("transform"):
            raise ValidationError(
                "mesh.testing runs no filters or transforms: test them on a server"
            )
        prop = Propagation(
            mode=PropagationMode(mode), source=source, targets=targets or [], types=types
        )
        self.propagations.append(prop)
        self._reconcile()
        return prop

    async def remove_propagation(self, prop_id: str) -> Propagation:
        for prop in self.propagations:
            if prop.id == prop_id:
                self.propagations.remove(prop)
                self._reconcile()
                return prop
        raise NotFound(f"unknown propagation {prop_id!r}")

    def _reconcile(self) -> None:
        names = set(self.targets)
        for t in self.targets.values():
            routes = compute_routes(t.name, self.propagations, names)
            self.memory.ensure_consumer(t.consumer, filters_for(self.subjects, t.name, routes))

    # Consuming ---------------------------------------------------------------------

    async def consume(
        self,
        target: str,
        *,
        batch: int = 10,
        expires: float = 2.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[Delivery, None]:
        """As ``MeshClient.consume``: yield the target's events; ack each once handled."""
        t = self.targets.get(target)
        if t is None:
            raise NotFound(f"unknown target {target!r}")
        deliveries = self.deliveries
        async for msgs in deliveries.pull(t.consumer, batch=batch, expires=expires, stop=stop):
            unseen = list(msgs)
            try:
                while unseen:
                    delivery = await deliveries.admit(target, unseen.pop(0))
                    if delivery is not None:
                        yield delivery
            finally:
                for msg in unseen:  # handed back, as on a server
                    with contextlib.suppress(Exception):
                        await msg.nak()


__all__ = ["MemoryDeliveries", "MemoryMessage", "MemoryPort", "TestMesh", "subject_matches_filter"]
