"""Real destination systems for the egress's drivers, each with a real consumer of that
system that counts what arrived.

RabbitMQ, Mosquitto and Redis are the machine's servers (their URLs come from
``MESH_TEST_AMQP_URL``, ``MESH_TEST_MQTT_URL``, ``MESH_TEST_REDIS_URL``; ``.ci/run``
starts them); every test uses names of its own (exchange, queue, topic, stream), and
reaches the server through a ``TCPProxy`` it can cut without touching the shared
server. SQS and S3 are moto's server (an emulator of the AWS APIs, run by the test as a
subprocess). Kafka is Tansu, a real Kafka-compatible broker (not Apache Kafka itself),
started per test behind the proxy it advertises (``tests/support/kafka.py``), or a broker
shared by a module's tests and reached directly (``tests/test_destinations_kafka_broker.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.proxy import TCPProxy

ENV = {
    "amqp": "MESH_TEST_AMQP_URL",
    "mqtt": "MESH_TEST_MQTT_URL",
    "redis": "MESH_TEST_REDIS_URL",
}
KINDS = ["amqp", "mqtt", "redis", "sqs", "s3", "kafka"]
KAFKA_PARTITIONS = 3
AWS_KEY, AWS_SECRET = "testing", "testing-secret"


def server_url(kind: str) -> str:
    """The URL of the machine's server for ``kind``, or skip the test saying why."""
    if kind in ("sqs", "s3", "kafka"):
        return ""
    url = os.environ.get(ENV[kind])
    if not url:
        pytest.skip(f"{ENV[kind]} is not set (.ci/run sets it and starts the server)")
    return url


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class Received:
    """What a consumer saw: event ids in arrival order, and each event's data."""

    ids: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, event_id: str, data: Any) -> None:
        self.ids.append(event_id)
        self.data[event_id] = data


# moto ---------------------------------------------------------------------------


class MotoServer:
    """moto's server mode in a subprocess on a free port."""

    def __init__(self) -> None:
        from mesh.broker import free_port

        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=AWS_KEY, AWS_SECRET_ACCESS_KEY=AWS_SECRET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def moto_server() -> Iterator[MotoServer]:
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def aws_client(service: str, endpoint: str) -> AsyncIterator[Any]:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        service,  # type: ignore[call-overload]
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_KEY,
        aws_secret_access_key=AWS_SECRET,
    ) as c:
        yield c


# One destination of a test ------------------------------------------------------------


class Destination:
    """One test's place at a real system: what the target points at, and a consumer.

    ``url``/``options`` go into the target (through ``proxy``); ``received`` fills as
    the real consumer reads; ``broken()`` gives url/options of a permanent failure
    (a missing exchange, queue, bucket; a stream key of another type).
    """

    def __init__(
        self, kind: str, upstream: str, proxy: TCPProxy | None, ordered: bool = False
    ) -> None:
        self.kind = kind
        self.upstream = upstream  # the real server's URL (the consumer's, not cut)
        self._proxy = proxy  # None: the target reaches the server directly (Kafka only)
        self.ordered = ordered
        self.tag = f"mesh-test-{uuid.uuid4().hex[:10]}"
        self.received = Received()
        self.url = ""
        self.options: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Destination:
        await getattr(self, f"_setup_{self.kind}")()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._stack.aclose()

    @property
    def proxy(self) -> TCPProxy:
        assert self._proxy is not None, "this destination has no proxy"
        return self._proxy

    def _spawn(self, coro: Any) -> None:
        self._task = asyncio.create_task(coro)

    async def count(self) -> int:
        """How many messages arrived, cheaply (one call to an emulator, not a read of all)."""
        if self.kind == "s3":
            n = 0
            paginator = self._s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.tag, Prefix="events/"):
                n += int(page.get("KeyCount", 0))
            return n
        await self.poll()
        return len(self.received.ids)

    async def poll(self) -> None:
        """Bring ``received`` up to date (for consumers that read on demand)."""
        reader = getattr(self, f"_poll_{self.kind}", None)
        if reader is not None:
            await reader()

    # amqp: a topic exchange of the test's own, an exclusive queue bound with '#'

    async def _setup_amqp(self) -> None:
        import aio_pika

        conn = await aio_pika.connect(self.upstream)
        self._stack.push_async_callback(conn.close)
        channel = await conn.channel()
        exchange = await channel.declare_exchange(
            self.tag, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(self.tag, exclusive=True)
        await queue.bind(exchange, "#")
        self.url = via(self.upstream, self.proxy.port)
        self.options = {"exchange": self.tag, "routing_key": "{type}"}

        async def consume() -> None:
            async with queue.iterator() as it:
                async for message in it:
                    self.received.add(message.message_id, json.loads(message.body))
                    await message.ack()

        self._spawn(consume())

    def _broken_amqp(self) -> dict[str, Any]:
        return {"exchange": f"{self.tag}-missing"}

    # mqtt: a topic prefix of the test's own, subscribed with QoS 1

    async def _setup_mqtt(self) -> None:
        import aiomqtt

        parts = urlsplit(self.upstream)
        ready = asyncio.Event()

        async def consume() -> None:
            async with aiomqtt.Client(
                parts.hostname or "127.0.0.1",
                parts.port or 1883,
                identifier=f"{self.tag}-rx",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as client:
                await client.subscribe(f"{self.tag}/#", qos=1)
                ready.set()
                async for message in client.messages:
                    props = dict(getattr(message.properties, "UserProperty", []) or [])
                    self.received.add(props["id"], json.loads(bytes(message.payload)))

        self._spawn(consume())
        await asyncio.wait_for(ready.wait(), 10)
        self.url = via(self.upstream, self.proxy.port)
        self.options = {"topic": self.tag + "/{type_path}"}

    def _broken_mqtt(self) -> dict[str, Any]:
        return {"topic": self.tag + "/{subject}"}  # the events have no subject

    # redis: a stream key of the test's own, read with XRANGE

    async def _setup_redis(self) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(self.upstream)
        self._stack.push_async_callback(self._redis.aclose)
        self._stack.push_async_callback(self._redis.delete, self.tag, f"{self.tag}-str")
        self._last = "-"
        self.url = via(self.upstream, self.proxy.port)
        self.options = {"stream": self.tag}

    async def _poll_redis(self) -> None:
        while True:
            start = self._last if self._last == "-" else "(" + self._last
            batch = await self._redis.xrange(self.tag, min=start, count=1000)
            if not batch:
                return
            for entry_id, fields in batch:
                self.received.add(fields[b"id"].decode(), json.loads(fields[b"data"]))
                self._last = entry_id.decode()

    async def _broken_redis_setup(self) -> dict[str, Any]:
        await self._redis.set(f"{self.tag}-str", "not a stream")
        return {"stream": f"{self.tag}-str"}

    # sqs (moto): a queue of the test's own (FIFO when ordered), received by a loop

    async def _setup_sqs(self) -> None:
        self._sqs = await self._stack.enter_async_context(aws_client("sqs", self.upstream))
        name = self.tag + (".fifo" if self.ordered else "")
        attrs = {"FifoQueue": "true"} if self.ordered else {}
        queue_url = (await self._sqs.create_queue(QueueName=name, Attributes=attrs))["QueueUrl"]
        self._queue_url = queue_url
        path = urlsplit(queue_url).path
        self.url = f"http://{AWS_KEY}:{AWS_SECRET}@127.0.0.1:{self.proxy.port}{path}"
        self.options = {"region": "us-east-1"}

    async def _poll_sqs(self) -> None:
        for _ in range(50):  # bounded: the egress may keep the queue from ever emptying
            answer = await self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                WaitTimeSeconds=0,
            )
            messages = answer.get("Messages", [])
            if not messages:
                return
            for m in messages:
                attrs = m.get("MessageAttributes", {})
                self.received.add(attrs["ce-id"]["StringValue"], json.loads(m["Body"]))
            # Deleted as read: moto scans the whole queue on every call, and a FIFO group
            # with a message in flight gives out no more.
            await self._sqs.delete_message_batch(
                QueueUrl=self._queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(messages)
                ],
            )

    def _broken_sqs(self) -> dict[str, Any]:
        self.url = self.url.replace(self.tag, self.tag + "-missing")
        return {}

    # s3 (moto): a bucket of the test's own, listed and read

    async def _setup_s3(self) -> None:
        self._s3 = await self._stack.enter_async_context(aws_client("s3", self.upstream))
        await self._s3.create_bucket(Bucket=self.tag)
        self._seen: set[str] = set()
        self.url = f"s3://{AWS_KEY}:{AWS_SECRET}@{self.tag}/events"
        self.options = {
            "endpoint_url": f"http://127.0.0.1:{self.proxy.port}",
            "region": "us-east-1",
        }

    async def _poll_s3(self) -> None:
        paginator = self._s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.tag, Prefix="events/"):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key in self._seen:
                    continue
                self._seen.add(key)
                body = await (await self._s3.get_object(Bucket=self.tag, Key=key))["Body"].read()
                doc = json.loads(body)
                self.received.add(doc["id"], doc["data"])

    # kafka: a topic of the test's own, every partition assigned to one consumer (no
    # group), read from the beginning. ``records``: (id, partition, key) as read. The
    # upstream URL may carry SASL credentials: the consumer logs in with them too.

    async def _setup_kafka(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from tests.support.kafka import client_config, create_topic

        config = client_config(self.upstream)
        await create_topic(config, self.tag, KAFKA_PARTITIONS)
        consumer = AIOKafkaConsumer(
            **config,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()

        async def stop() -> None:
            # A fetch that failed while the proxy was cut may surface here: it is over.
            # aiokafka's fetcher.close() cancels its own fetch task and can re-raise that
            # CancelledError from stop(); only a cancellation of this task goes on.
            try:
                await consumer.stop()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except Exception:  # teardown of the test's own consumer
                pass

        self._stack.push_async_callback(stop)
        partitions = [TopicPartition(self.tag, p) for p in range(KAFKA_PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self.records: list[tuple[str, int, bytes | None]] = []
        self.headers: dict[str, dict[str, bytes]] = {}
        self.url = via(self.upstream, self._proxy.port) if self._proxy else self.upstream
        self.options = {"topic": self.tag}

        async def consume() -> None:
            from aiokafka.errors import KafkaError

            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=200)
                except KafkaError:  # the proxy is cut: the consumer reconnects by itself
                    await asyncio.sleep(0.1)
                    continue
                for tp, messages in batches.items():
                    for m in messages:
                        headers = {k: bytes(v) for k, v in m.headers}
                        event_id = headers["ce_id"].decode()
                        self.headers[event_id] = headers
                        self.records.append((event_id, tp.partition, m.key))
                        try:
                            data = json.loads(m.value or b"null")
                        except ValueError:  # text/plain and the like
                            data = (m.value or b"").decode()
                        self.received.add(event_id, data)

        self._spawn(consume())

    def _broken_kafka(self) -> dict[str, Any]:
        return {"topic": f"{self.tag}-missing"}  # mesh never creates a topic

    def _broken_s3(self) -> dict[str, Any]:
        self.url = self.url.replace(self.tag, self.tag + "-missing")
        return {}

    async def broken(self) -> dict[str, Any]:
        """Point at something missing: the options to use instead (``url`` may change)."""
        special = getattr(self, f"_broken_{self.kind}_setup", None)
        if special is not None:
            extra: dict[str, Any] = await special()
        else:
            extra = getattr(self, f"_broken_{self.kind}")()
        return {**self.options, **extra}


# A destination that stops answering (tests/test_destinations_{mqtt,redis}.py) ------------

MUTE_TIMEOUT_S = 0.5


def mute_target(kind: Any, url: str, **options: str) -> Any:
    """A target with a short timeout, for a server that never answers."""
    from mesh.destinations import DestinationOptions
    from mesh.registry import Target

    return Target(
        name="mute", kind=kind, url=url, timeout_s=MUTE_TIMEOUT_S,
        options=DestinationOptions(**options),
    )  # fmt: skip


def three_events() -> list[Any]:
    from mesh.envelope import Event

    return [Event(source="shop", type="order.created", data={"n": i}) for i in range(3)]


def assert_timed_out_as_retries(results: list[Any], took: float) -> None:
    """Each send failed at the target's deadline as a retry (never a dead letter), and
    two deadlines passed, not the library's own (seconds) timeout."""
    for result in results:
        assert not result.ok and not result.permanent
        assert f"timeout after {MUTE_TIMEOUT_S}s" in (result.error or ""), result.error
    assert took < 3.0
