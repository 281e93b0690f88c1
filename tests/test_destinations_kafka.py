"""The Kafka driver against a real Kafka-compatible broker: Tansu (Rust, the Kafka wire
protocol, in-memory storage; not Apache Kafka itself, which no package registry reachable
here carries), started per test on a free port behind a cuttable proxy it advertises.

The promises every driver keeps (1,000 events through an outage, the breaker, the DLQ,
publish order) are in tests/test_destinations.py, parametrized over the kinds; here is
what is Kafka's own: the key template keeps one key's order on one partition, the batch
shape, a missing topic, the record layout (CloudEvents binary mode in headers), the
producer's settings, and the CLI/API with SASL credentials sealed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("aiokafka")

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.destinations import DestinationOptions, validate_destination
from mesh.envelope import Event
from mesh.errors import ValidationError
from mesh.registry import Target, TargetKind
from services.egress.drivers.kafka import KafkaDriver, UnknownTopic, headers_of
from services.egress.service import WebhookEgress
from tests.support import eventually
from tests.support.cli import ok, run_cli
from tests.support.destinations import KAFKA_PARTITIONS, Destination
from tests.support.kafka import add_keyed_target, kafka_behind_proxy


@pytest.fixture
async def kafka() -> AsyncIterator[Destination]:
    """A fresh Tansu behind a proxy, a topic of three partitions and a consumer of it."""
    async with (
        kafka_behind_proxy() as (broker, proxy),
        Destination("kafka", f"kafka://{broker.bootstrap}", proxy) as d,
    ):
        yield d


def _target(url: str, **options: Any) -> Target:
    return Target(
        name="k",
        kind=TargetKind.KAFKA,
        url=url,
        timeout_s=3.0,
        options=DestinationOptions(**options),
    )


def _event(subject: str | None = None, n: int = 0) -> Event:
    return Event(source="shop", type="order.created", subject=subject, data={"n": n})


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (as the Java client computes it)."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


# Against the broker ------------------------------------------------------------------


async def test_one_key_keeps_its_order_on_its_partition(
    kafka: Destination, client: MeshClient, egress: WebhookEgress
) -> None:
    await add_keyed_target(client, kafka.url, kafka.tag)
    subjects = ["alice", "bob", "carol", "dave", "erin"]
    published = [_event(subjects[i % 5], i) for i in range(50)]
    await client.publish_many(published)
    want = {e.id for e in published}
    await eventually(lambda: _arrived(kafka, want), 30, "the 50 events")
    partition_of = {eid: (part, key) for eid, part, key in kafka.records}
    for subject in subjects:
        mine = [e.id for e in published if e.subject == subject]
        # The record key is the subject; Kafka's partitioner puts the key on one partition.
        keyed = {partition_of[i] for i in mine}
        expected = murmur2_partition(subject.encode(), KAFKA_PARTITIONS)
        assert keyed == {(expected, subject.encode())}
        # In that partition, this key's events are in publish order.
        seen = [eid for eid, part, _ in kafka.records if eid in set(mine)]
        assert list(dict.fromkeys(seen)) == mine
    assert len({p for p, _ in partition_of.values()}) > 1  # the keys spread over partitions


async def _arrived(d: Destination, want: set[str]) -> bool:
    return want <= set(d.received.ids)


async def test_records_are_cloudevents_binary_mode(kafka: Destination) -> None:
    driver = KafkaDriver(_target(kafka.url, topic=kafka.tag, key=""), kafka.url)
    event = Event(
        source="shop", type="order.created", subject="o-1", data="hi", datacontenttype="text/plain"
    )
    try:
        result = await driver.send(event)
    finally:
        await driver.close()
    assert result.ok, result.error
    await eventually(lambda: _arrived(kafka, {event.id}), 10, "the record")
    headers = kafka.headers[event.id]
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_source"] == b"shop" and headers["ce_type"] == b"order.created"
    assert headers["ce_subject"] == b"o-1" and headers["content-type"] == b"text/plain"
    assert kafka.received.data[event.id] == "hi"
    assert [key for eid, _, key in kafka.records if eid == event.id] == [None]  # key ''


async def test_batch_one_result_each_and_a_bad_record_fails_alone(kafka: Destination) -> None:
    driver = KafkaDriver(_target(kafka.url, topic=kafka.tag, key="{subject}"), kafka.url)
    events = [_event(f"s{i % 3}", i) for i in range(30)]
    events.insert(7, _event(None))  # no subject: the key template cannot be filled
    try:
        results = await driver.send_batch(events)
    finally:
        await driver.close()
    assert len(results) == 31
    assert [r.ok for r in results] == [i != 7 for i in range(31)]
    assert results[7].permanent and "cannot fill" in (results[7].error or "")
    want = {e.id for i, e in enumerate(events) if i != 7}
    await eventually(lambda: _arrived(kafka, want), 10, "the 30 records")
    assert set(kafka.received.ids) == want


async def test_a_batch_over_partitions_keeps_each_key_in_order(kafka: Destination) -> None:
    """``send_batch`` makes one record batch per partition: every key still lands on the
    partition ``producer.send`` would pick, in the events' order, batch after batch."""
    driver = KafkaDriver(_target(kafka.url, topic=kafka.tag, key="{subject}"), kafka.url)
    subjects = [f"k{i}" for i in range(8)]
    events = [_event(subjects[i % 8], i) for i in range(96)]
    try:
        for start in range(0, 96, 32):
            results = await driver.send_batch(events[start : start + 32])
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        # The partition chosen for a batch is the producer's own (aiokafka's private
        # ``_partition``, pinned here: this test breaks if it changes).
        producer = driver._producer
        for subject in subjects:
            key = subject.encode()
            mine = await driver._partition(kafka.tag, key)
            assert mine == producer._partition(kafka.tag, None, key, None, key, None)
    finally:
        await driver.close()
    await eventually(lambda: _arrived(kafka, {e.id for e in events}), 20, "the 96 records")
    partition_of = {eid: (part, key) for eid, part, key in kafka.records}
    for subject in subjects:
        mine = [e.id for e in events if e.subject == subject]
        expected = murmur2_partition(subject.encode(), KAFKA_PARTITIONS)
        assert {partition_of[i] for i in mine} == {(expected, subject.encode())}
        seen = [eid for eid, _, _ in kafka.records if eid in set(mine)]
        assert list(dict.fromkeys(seen)) == mine
    assert len({p for p, _ in partition_of.values()}) == KAFKA_PARTITIONS


async def test_two_batches_out_at_once_both_arrive_in_full(kafka: Destination) -> None:
    """Two chunks on the wire at once (the egress sends a second only when it fits beside
    the first whole): each goes as its own record batches, and both succeed in full."""
    driver = KafkaDriver(_target(kafka.url, topic=kafka.tag, key="{subject}"), kafka.url)
    first = [_event(f"s{i % 3}", i) for i in range(20)]
    second = [_event(f"s{i % 3}", 20 + i) for i in range(20)]
    try:
        assert (await driver.send(_event("s0"))).ok  # connected, topic known
        a, b = await asyncio.gather(driver.send_batch(first), driver.send_batch(second))
    finally:
        await driver.close()
    assert all(r.ok for r in [*a, *b])
    want = {e.id for e in first + second}
    await eventually(lambda: _arrived(kafka, want), 20, "the 40 records")


async def test_batch_to_a_missing_topic_is_permanent_and_creates_nothing(
    kafka: Destination,
) -> None:
    missing = f"{kafka.tag}-missing"
    driver = KafkaDriver(_target(kafka.url, topic=missing), kafka.url)
    try:
        results = await driver.send_batch([_event(n=i) for i in range(3)])
        single = await driver.send(_event())
    finally:
        await driver.close()
    assert all(r.permanent and not r.ok for r in [*results, single])
    assert "no topic" in (single.error or "")
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.upstream.removeprefix("kafka://"))
    await consumer.start()
    try:
        assert missing not in await consumer.topics()  # no auto-creation by mesh
    finally:
        await consumer.stop()


async def test_a_cut_link_is_a_retry_not_a_dead_letter(kafka: Destination) -> None:
    driver = KafkaDriver(_target(kafka.url, topic=kafka.tag), kafka.url)
    try:
        assert (await driver.send(_event())).ok  # connected, topic known
        kafka.proxy.trigger_connectivity_loss()
        results = await driver.send_batch([_event(n=i) for i in range(5)])
        assert not any(r.ok for r in results)
        assert not any(r.permanent for r in results)
        kafka.proxy.restore_connectivity()
        again = [_event(n=i) for i in range(5)]
        later = await eventually(lambda: _all_ok(driver, again), 20, "sending after the cut")
        assert all(r.ok for r in later)
    finally:
        await driver.close()


async def _all_ok(driver: KafkaDriver, events: list[Event]) -> Any:
    results = await driver.send_batch(events)
    return results if all(r.ok for r in results) else None


# Settings, validation, CLI, API ---------------------------------------------------


class _Batch:
    def __init__(self) -> None:
        self.keys: list[bytes | None] = []

    def append(self, *, timestamp: Any, key: bytes | None, value: bytes, headers: Any) -> object:
        self.keys.append(key)
        return object()


class _Producer:
    """A producer whose record batches end as ``outcome`` says per partition (no broker)."""

    def __init__(self, outcome: dict[int, Exception | None]) -> None:
        self.outcome = outcome
        self.sent: list[tuple[int, list[bytes | None]]] = []
        cluster = SimpleNamespace(available_partitions_for_topic=lambda topic: set(outcome))
        self.client = SimpleNamespace(cluster=cluster)

    async def partitions_for(self, topic: str) -> set[int]:
        return set(self.outcome)

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int) -> Any:
        self.sent.append((partition, batch.keys))
        future = asyncio.get_running_loop().create_future()
        error = self.outcome[partition]
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
        return future

    async def stop(self) -> None:
        pass


async def test_a_failed_partition_batch_fails_every_event_in_it() -> None:
    from aiokafka.errors import NotLeaderForPartitionError, TopicAuthorizationFailedError

    driver = KafkaDriver(_target("kafka://h", topic="t", key="{subject}"), "kafka://h")
    # One subject per partition of three, each partition's batch ending its own way.
    by_partition: dict[int, str] = {}
    for i in range(100):
        by_partition.setdefault(murmur2_partition(f"s{i}".encode(), 3), f"s{i}")
    producer = _Producer(
        {0: None, 1: NotLeaderForPartitionError(), 2: TopicAuthorizationFailedError()}
    )
    driver._producer, driver._topics, driver.connected = producer, {"t"}, True
    events = [_event(by_partition[i % 3], i) for i in range(30)]
    results = await driver.send_batch(events)
    await driver.close()
    assert sorted(p for p, _ in producer.sent) == [0, 1, 2]  # one batch per partition
    for partition, keys in producer.sent:
        assert keys == [by_partition[partition].encode()] * 10
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert result.ok
        elif i % 3 == 1:  # retried, like every record of that batch
            assert not result.ok and not result.permanent
            assert "NotLeaderForPartitionError" in (result.error or "")
        else:  # refused for good: dead-lettered, every record of that batch
            assert result.permanent and "TopicAuthorizationFailed" in (result.error or "")


def test_producer_settings_from_the_url() -> None:
    plain = KafkaDriver(_target("kafka://broker:9093"), "kafka://broker:9093").producer_config()
    assert plain["bootstrap_servers"] == "broker:9093"
    assert plain["acks"] == "all" and plain["security_protocol"] == "PLAINTEXT"
    assert plain["request_timeout_ms"] == 3000
    url = "kafkas://svc%40acct:pa55@broker/?mechanism=scram-sha-512"
    sasl = KafkaDriver(_target(url), url).producer_config()
    assert sasl["bootstrap_servers"] == "broker:9092"
    assert sasl["security_protocol"] == "SASL_SSL" and sasl["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (sasl["sasl_plain_username"], sasl["sasl_plain_password"]) == ("svc@acct", "pa55")


async def test_a_login_apache_kafka_refuses_reads_as_refused_not_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Apache Kafka answers a wrong SCRAM password with SaslAuthenticate error 58, which
    aiokafka's bootstrap only logs ("Unable to bootstrap"); the driver's own handshake
    (here aiokafka's ``create_conn`` raising as it does on that answer; no Apache Kafka
    can run here) turns it into a clear retry. Anything else keeps the original error."""
    import aiokafka.conn
    from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

    url = "kafka://svc:pa55word@127.0.0.1:1?mechanism=SCRAM-SHA-256"
    driver = KafkaDriver(_target(url), url)
    answer: list[Exception] = []

    async def create_conn(*args: Any, **kwargs: Any) -> Any:
        raise answer[0]

    monkeypatch.setattr(aiokafka.conn, "create_conn", create_conn)
    answer.append(
        SaslAuthenticationFailed(
            "Authentication failed during authentication due to invalid credentials "
            "with SASL mechanism SCRAM-SHA-256"
        )
    )
    refused = await driver._refused_login(driver.producer_config())
    assert refused is not None and not driver.is_permanent(refused)
    text = str(refused)
    assert text.startswith("SASL SCRAM-SHA-256 login as 'svc' refused: ")
    assert "invalid credentials" in text and "pa55word" not in text
    answer[0] = ValueError("Server sent wrong signature!")  # not the broker we know
    wrong = await driver._refused_login(driver.producer_config())
    assert str(wrong) == "SASL SCRAM-SHA-256 login as 'svc' failed: Server sent wrong signature!"
    answer[0] = KafkaConnectionError("Connection at 127.0.0.1:1 closed")
    assert await driver._refused_login(driver.producer_config()) is None
    answer[0] = ConnectionRefusedError(111, "Connect call failed")
    assert await driver._refused_login(driver.producer_config()) is None


def test_kafka_defaults_and_headers() -> None:
    driver = KafkaDriver(_target("kafka://h"), "kafka://h")
    assert (driver.options.topic, driver.options.key) == ("{source}", "{source}")
    event = Event(source="shop", type="a.b", data={"x": 1}, extensions={"tenant": "t1"})
    headers = dict(headers_of(event, "application/json"))
    assert headers["ce_id"] == event.id.encode() and headers["ce_tenant"] == b"t1"
    assert headers["content-type"] == b"application/json"


@pytest.mark.parametrize(
    ("url", "options", "error"),
    [
        ("http://h:9092", {}, "starts with kafka://"),
        ("kafka://h", {"topic": "a/{source}"}, "Kafka topic"),
        ("kafka://h", {"key": "{nope}"}, "unknown field"),
        ("kafka://h?mechanism=GSSAPI", {}, "not one of"),
        ("kafka://h?acks=1", {}, "unknown parameter"),
    ],
)
def test_validate_kafka_refuses(url: str, options: dict[str, str], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        validate_destination("kafka", url, DestinationOptions(**options))


async def test_a_rendered_topic_kafka_refuses_is_permanent(kafka: Destination) -> None:
    driver = KafkaDriver(_target(kafka.url, topic="t-{type_path}"), kafka.url)  # '/' from the type
    try:
        result = await driver.send(_event())
    finally:
        await driver.close()
    assert result.permanent and "not a Kafka topic" in (result.error or "")
    assert driver.is_permanent(UnknownTopic("gone"))


async def test_cli_and_api_seal_kafka_credentials(settings: Settings, client: MeshClient) -> None:
    url = "kafka://svc:pa55word@127.0.0.1:9092?mechanism=SCRAM-SHA-256"
    p = ok(
        await run_cli(
            settings,
            "target",
            "add",
            "stream-k",
            "--kafka",
            url,
            "--topic",
            "orders",
            "--key",
            "{subject}",
        )
    )
    assert "pa55word" not in p.stdout + p.stderr
    listed = ok(await run_cli(settings, "target", "list", "--json"))
    assert "pa55word" not in listed.stdout
    doc = {t["name"]: t for t in json.loads(listed.stdout)}["stream-k"]
    assert doc["kind"] == "kafka" and doc["url"].startswith("kafka://svc:***@127.0.0.1:9092")
    assert (doc["options"]["topic"], doc["options"]["key"]) == ("orders", "{subject}")
    stored = await client.registry.get_target("stream-k")
    assert client.registry.destination_url(stored) == url
    # Defaults of the kind when no --topic/--key is given (not MQTT's or S3's).
    ok(await run_cli(settings, "target", "add", "k2", "--kafka", "kafka://127.0.0.1:9092"))
    k2 = await client.registry.get_target("k2")
    assert k2.options is not None and (k2.options.topic, k2.options.key) == ("{source}", "{source}")
    bad = await run_cli(settings, "target", "add", "k3", "--kafka", "kafka://h", "--qos", "1")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["mesh: error: --qos is for --mqtt targets"]

    from tests.support.api import Http, api_running, make_key

    _, admin = await make_key(client, "admin")
    body = {"name": "k4", "kind": "kafka", "url": url, "options": {"topic": "orders"}}
    async with api_running(settings) as api, Http(api.url) as http:
        status, _, created = await http.call("POST", "/v1/targets", body, key=admin)
        assert status == 201, created
        assert "pa55word" not in json.dumps(created) and "url_enc" not in created
        assert created["options"]["key"] == "{source}"
        status, _, got = await http.call("GET", "/v1/targets/k4", key=admin)
        assert status == 200 and "pa55word" not in json.dumps(got)
