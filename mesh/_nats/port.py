"""``JetStreamPort``: every call the mesh makes into nats.py, on one connection.

``MeshClient`` holds one as ``client.port``; services and operator modules use it
instead of nats.py's ``Client``/``JetStreamContext``. One implementation per path:

- publish: ``publish_acked`` (awaited, cheap acks: ``AckedPublisher``), ``publish``
  (the same publisher, the answer parsed and nats.py's errors raised: dead letters,
  audit, DLQ tools, revocations with a TTL), ``publish_many``
  (a pipelined list), ``ack_window`` (pipelined one by one: replay) and ``pubpipe``
  (pipelined with retries: the egress's delivery records);
- read: ``pull`` (a durable consumer, forever), ``scan`` (a stream range),
  ``subscribe`` and ``subscribe_stream`` (core and ordered push subscriptions);
- admin: streams, consumers (info, ensure, delete, pause, resume, names), messages,
  buckets, and ``api_request``, the one place nats.py's private ``_api_request`` is used;
- depths: ``queue_depth`` and ``dlq_depths``.

``mesh.port.Port`` is the part a user program's code depends on; ``mesh.testing`` has an
in-memory one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats import micro
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AccountInfo,
    ConsumerConfig,
    ConsumerInfo,
    Header,
    PubAck,
    RawStreamMsg,
    StreamConfig,
    StreamInfo,
)
from nats.js.kv import KeyValue

from mesh._nats.acks import ack_many
from mesh._nats.api import api_request
from mesh._nats.buckets import open_bucket, read_all
from mesh._nats.headers import MeshNats
from mesh._nats.pipeline import PUBLISH_WINDOW, AckWindow, publish_pipelined
from mesh._nats.pubpipe import AckedPublisher, PubPipe, no_stream
from mesh._nats.pull import pull_batches
from mesh._nats.scan import SCAN_BATCH, scan
from mesh.errors import BrokerError
from mesh.publishing import Encoded

if TYPE_CHECKING:
    from mesh.envelope import Event

DEFAULT_MAX_PAYLOAD = 1024 * 1024


ACK_TIMEOUT_S = 5.0  # an awaited publish without a timeout of its own (nats.py's)


class JetStreamPort:
    """One NATS connection and its JetStream context (see the module doc)."""

    def __init__(self, nc: NATS | None = None) -> None:
        self.nc: NATS = nc or MeshNats()
        self._js: JetStreamContext | None = None
        self._acked = AckedPublisher(self.nc)

    # Connection ---------------------------------------------------------------

    def bind(self, timeout: float = 10.0) -> None:
        """Open the JetStream context (after the connection is up)."""
        self._js = self.nc.jetstream(timeout=timeout)

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerError("not connected")
        return self._js

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload or DEFAULT_MAX_PAYLOAD

    @property
    def is_closed(self) -> bool:
        return self.nc.is_closed

    @property
    def is_connected(self) -> bool:
        return self.nc.is_connected

    @property
    def connected_url(self) -> str:
        url = self.nc.connected_url
        return str(url.geturl()) if url else ""

    @property
    def connected_host(self) -> str:
        url = self.nc.connected_url
        return str(url.netloc) if url else ""

    @property
    def server_url(self) -> Any:
        """The connected server's URL (``urllib.parse.ParseResult``), or None."""
        return self.nc.connected_url

    @property
    def where(self) -> str:
        """``scheme://host:port`` of the connected server, for messages."""
        url = self.nc.connected_url
        return f"{url.scheme}://{url.netloc}" if url else "the NATS server"

    @property
    def server_info(self) -> dict[str, Any]:
        """The INFO the server sent on connect."""
        return dict(getattr(self.nc, "_server_info", None) or {})

    @property
    def server_version(self) -> Any:
        return self.nc.connected_server_version

    async def close(self) -> None:
        """Drain (up to 5 s), then close; errors on the way are of no interest."""
        if self.nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), 5)
        with contextlib.suppress(Exception):
            await self.nc.close()

    # Core NATS ----------------------------------------------------------------

    async def send(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """A core publish (no stream acknowledges it)."""
        await self.nc.publish(subject, data, headers=headers)

    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        return await self.nc.request(subject, data, timeout=timeout, headers=headers)

    async def gather(
        self, subject: str, *, flush_timeout: int = 1, next_timeout: float = 0.3
    ) -> list[Msg]:
        """Ask ``subject`` (a core request to many responders) and collect the answers that
        arrive, each within ``next_timeout`` of the one before."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        answers: list[Msg] = []
        try:
            await self.nc.publish(subject, b"", reply=inbox)
            await self.nc.flush(timeout=flush_timeout)
            with contextlib.suppress(nats_errors.TimeoutError, TimeoutError):
                while True:
                    answers.append(await sub.next_msg(timeout=next_timeout))
        finally:
            await sub.unsubscribe()
        return answers

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str = "",
        cb: Callable[[Msg], Awaitable[None]] | None = None,
        **kw: Any,
    ) -> Subscription:
        """A core subscription; ``kw``: nats.py's (``pending_msgs_limit``...)."""
        return await self.nc.subscribe(subject, queue=queue, cb=cb, **kw)

    async def add_micro_service(self, **kw: Any) -> Any:
        """Register a NATS micro service on this connection (``nats.micro.add_service``)."""
        return await micro.add_service(self.nc, **kw)

    # JetStream publish ----------------------------------------------------------

    async def publish_acked(
        self, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        """Publish and wait for the stream's answer (``pubpipe.ack_error`` reads it)."""
        return await self._acked.publish(subject, body, headers, timeout)

    async def publish(
        self,
        subject: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        stream: str | None = None,
        msg_ttl: float | None = None,
    ) -> PubAck:
        """Publish and wait for the acknowledgement, parsed; raises what nats.py's
        ``js.publish`` raises (``NoStreamResponseError``, ``APIError``, a timeout).
        ``stream``: the stream expected to store it; ``msg_ttl``: seconds (2.11+).
        The same acked path as ``publish_acked`` (one implementation of an awaited
        publish), where a caller checks the answer itself."""
        hdr = dict(headers) if headers else {}
        if stream is not None:
            hdr[Header.EXPECTED_STREAM] = stream
        if msg_ttl is not None:
            hdr[Header.MSG_TTL] = str(int(msg_ttl))
        msg = await self._acked.publish(subject, body, hdr or None, timeout or ACK_TIMEOUT_S)
        if no_stream(msg):
            raise js_errors.NoStreamResponseError
        try:
            resp = json.loads(msg.data)
        except ValueError:
            raise js_errors.APIError(description="unreadable acknowledgement") from None
        if "error" in resp:
            raise js_errors.APIError.from_error(resp["error"])
        return PubAck.from_response(resp)

    async def publish_many(
        self,
        events: list[Event],
        encode: Callable[[Event], Encoded],
        *,
        window: int = 1024,
        timeout: float = 10.0,
    ) -> int:
        """Pipelined publish of ``events``; returns how many were new (``publish_pipelined``)."""
        return await publish_pipelined(
            self.js, events, encode, self.max_payload, window=window, timeout=timeout
        )

    async def ack_many(self, msgs: list[Msg]) -> list[tuple[Msg, Exception]]:
        """Ack ``msgs`` (JetStream deliveries) together; the ones that failed, with why."""
        return await ack_many(msgs)

    def ack_window(self, window: int = PUBLISH_WINDOW) -> AckWindow:
        return AckWindow(self.js, window)

    def pubpipe(self, **kw: Any) -> PubPipe:
        """A ``PubPipe`` on this connection (call ``open``)."""
        return PubPipe(self.nc, **kw)

    # Reading ------------------------------------------------------------------

    def pull(
        self,
        stream: str,
        consumer: str,
        *,
        batch: int = 10,
        expires: float = 2.0,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[list[Msg], None]:
        return pull_batches(self.nc, stream, consumer, batch=batch, expires=expires, stop=stop)

    def scan(
        self,
        stream: str,
        filters: list[str],
        *,
        start_time: datetime | None = None,
        start_seq: int | None = None,
        batch: int = SCAN_BATCH,
        on_total: Callable[[int], None] | None = None,
    ) -> AsyncIterator[Msg]:
        return scan(
            self.js,
            stream,
            filters,
            start_time=start_time,
            start_seq=start_seq,
            batch=batch,
            on_total=on_total,
        )

    async def subscribe_stream(
        self, subject: str, *, ordered_consumer: bool = True, **kw: Any
    ) -> Any:
        """A JetStream push subscription (an ordered consumer by default); ``kw``:
        nats.py's (``stream``, ``config``, ``cb``, ``deliver_policy``...)."""
        return await self.js.subscribe(subject, ordered_consumer=ordered_consumer, **kw)

    # Admin --------------------------------------------------------------------

    async def api_request(
        self, api: str, payload: bytes = b"", *, timeout: float = 5.0
    ) -> dict[str, Any]:
        return await api_request(self.js, api, payload, timeout=timeout)

    async def add_stream(self, config: StreamConfig) -> StreamInfo:
        return await self.js.add_stream(config)

    async def update_stream(self, config: StreamConfig) -> StreamInfo:
        return await self.js.update_stream(config)

    async def account_info(self) -> AccountInfo:
        return await self.js.account_info()

    async def stream_info(self, stream: str, subjects_filter: str | None = None) -> StreamInfo:
        return await self.js.stream_info(stream, subjects_filter=subjects_filter)

    async def get_msg(self, stream: str, seq: int) -> RawStreamMsg:
        return await self.js.get_msg(stream, seq)

    async def delete_msg(self, stream: str, seq: int) -> bool:
        return await self.js.delete_msg(stream, seq)

    async def consumer_info(self, stream: str, consumer: str) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(stream, consumer)
        return info

    async def ensure_consumer(self, stream: str, config: ConsumerConfig) -> ConsumerInfo:
        """Create the consumer, or update it to ``config`` (JetStream's add is both)."""
        return await self.js.add_consumer(stream, config)

    async def delete_consumer(self, stream: str, consumer: str) -> None:
        with contextlib.suppress(js_errors.NotFoundError):
            await self.js.delete_consumer(stream, consumer)

    async def pause_consumer(self, stream: str, consumer: str, until: str) -> None:
        await self.js.pause_consumer(stream, consumer, until)

    async def resume_consumer(self, stream: str, consumer: str) -> None:
        await self.js.resume_consumer(stream, consumer)

    async def consumer_names(self, stream: str) -> list[str]:
        """The consumers of ``stream`` (nats.py has no paged name listing)."""
        resp = await self.api_request(f"CONSUMER.NAMES.{stream}", timeout=5)
        return list(resp.get("consumers") or [])

    async def key_value(self, bucket: str) -> KeyValue:
        return await self.js.key_value(bucket)

    async def create_key_value(self, **kw: Any) -> KeyValue:
        return await self.js.create_key_value(**kw)

    async def open_bucket(self, bucket: str, *, history: int = 1, replicas: int = 1) -> KeyValue:
        return await open_bucket(self.js, bucket, history=history, replicas=replicas)

    async def read_all(self, kv: KeyValue, bucket: str) -> dict[str, bytes]:
        return await read_all(self.js, kv, bucket)

    # Depths -------------------------------------------------------------------

    async def queue_depth(self, stream: str, consumer: str) -> dict[str, Any]:
        """A consumer's queue: lag = pending (not yet delivered) + unacked (in flight)."""
        ci = await self.js.consumer_info(stream, consumer)
        pending, unacked = int(ci.num_pending or 0), int(ci.num_ack_pending or 0)
        return {
            "lag": pending + unacked,
            "pending": pending,
            "unacked": unacked,
            "redelivered": int(ci.num_redelivered or 0),
            "paused": bool(getattr(ci, "paused", False)),
        }

    async def dlq_depths(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """Messages retained per target reference (what follows the filter's ``>``: a name,
        or a tenant's ``~tenant.name``) in a DLQ stream."""
        info = await self.js.stream_info(stream, subjects_filter=subjects_filter)
        head = subjects_filter.removesuffix(">")
        return {s.removeprefix(head): int(n) for s, n in (info.state.subjects or {}).items()}
