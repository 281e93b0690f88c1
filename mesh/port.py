"""``Port``: what the user API of ``MeshClient`` needs from a broker.

``mesh._nats.JetStreamPort`` is the real one (NATS JetStream); ``mesh.testing.MemoryPort``
keeps everything in memory, so that a program's handlers are tested without a server.
A message a port hands out is a ``Message``: nats.py's ``Msg`` is one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mesh.envelope import Event
    from mesh.publishing import Encoded


@runtime_checkable
class Message(Protocol):
    """One message from a stream: what ``Delivery`` and ``decode_event`` use."""

    subject: str
    reply: str
    data: bytes

    @property
    def headers(self) -> dict[str, str] | None: ...

    @property
    def metadata(self) -> Any: ...  # .sequence.stream, .num_delivered, .timestamp

    async def ack_sync(self, timeout: float = ...) -> Any: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None: ...

    async def term(self) -> None: ...


@runtime_checkable
class Port(Protocol):
    """Publish, publish many, pull: the broker calls behind ``publish``, ``publish_many``
    and ``consume``."""

    @property
    def max_payload(self) -> int: ...

    async def publish_acked(
        self, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Any:
        """Publish and wait for the stream's answer: a message whose ``headers`` and
        ``data`` ``mesh._nats.pubpipe.ack_error`` and ``ack_duplicate`` read."""
        ...

    async def publish(
        self,
        subject: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any: ...

    async def publish_many(
        self,
        events: list[Event],
        encode: Callable[[Event], Encoded],
        *,
        window: int = ...,
        timeout: float = ...,
    ) -> int: ...

    def pull(
        self,
        stream: str,
        consumer: str,
        *,
        batch: int = ...,
        expires: float = ...,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[list[Any], None]: ...

    async def close(self) -> None: ...
