"""Destinations: options, templates, sealed URLs, message mappings, the CLI's flags, and
the drivers' batch shape (against the real Redis and moto's SQS)."""

from __future__ import annotations

import json

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.destinations import (
    DestinationOptions,
    check_template,
    redact,
    render,
    validate_destination,
)
from mesh.envelope import Event
from mesh.errors import ValidationError
from mesh.registry import Target, TargetKind
from services.egress.drivers.aws import S3Driver, SqsDriver
from services.egress.drivers.formats import attributes, structured
from tests.support.cli import ok, run_cli
from tests.support.destinations import MotoServer, aws_client, moto_server, server_url


def test_redact_hides_the_password_only() -> None:
    assert redact("amqp://guest:s3cret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact("mqtt://host:1883") == "mqtt://host:1883"
    assert "s3cret" not in redact("https://KEY:s3cret@sqs.eu-west-1.amazonaws.com/1/q")


@pytest.mark.parametrize(
    ("kind", "url", "options", "error"),
    [
        ("amqp", "http://h/", {"exchange": "x"}, "starts with amqp://"),
        ("amqp", "amqp://h/", {}, "needs --exchange"),
        ("amqp", "amqp://h/", {"exchange": "x", "routing_key": "{nope}"}, "unknown field"),
        ("mqtt", "mqtt:///", {}, "names no host"),
        ("sqs", "https://sqs.us-east-1.amazonaws.com/", {}, "queue URL"),
        ("s3", "s3://bucket", {"key": "{type"}, "key template"),
        ("redis", "redis://h:99999/", {}, "invalid redis URL"),
    ],
)
def test_validate_destination_refuses(
    kind: str, url: str, options: dict[str, str], error: str
) -> None:
    with pytest.raises(ValidationError, match=error):
        validate_destination(kind, url, DestinationOptions(**options))


def test_templates() -> None:
    check_template("{source}/{type_path}/{id}", "key")
    fields = {"id": "1", "source": "shop", "type": "order.created", "type_path": "order/created"}
    assert render("{source}.{type}", fields) == "shop.order.created"
    with pytest.raises(ValidationError, match="cannot fill"):
        render("{subject}", fields)  # an event without a subject


def _event(**kw: object) -> Event:
    return Event(source="shop", type="order.created", data={"n": 1}, **kw)  # type: ignore[arg-type]


def _target(kind: TargetKind, url: str, **options: object) -> Target:
    return Target(name="t", kind=kind, url=url, options=DestinationOptions(**options))  # type: ignore[arg-type]


def test_sqs_binary_mode_and_structured_fallback() -> None:
    url = "http://k:s@127.0.0.1:1/123/q.fifo"
    driver = SqsDriver(_target(TargetKind.SQS, url, group_id="{source}-{type}"), url)
    assert driver.queue_url == "http://127.0.0.1:1/123/q.fifo"  # no credentials in it
    event = _event()
    msg = driver.message(event)
    assert json.loads(msg["MessageBody"]) == {"n": 1}
    attrs = {k: v["StringValue"] for k, v in msg["MessageAttributes"].items()}
    assert attrs["ce-id"] == event.id and attrs["ce-type"] == "order.created"
    assert attrs["content-type"] == "application/json"
    assert msg["MessageGroupId"] == "shop-order.created"
    assert msg["MessageDeduplicationId"] == event.id
    # More attributes than SQS takes (10): the whole event goes as structured JSON.
    many = _event(extensions={f"ext{i}": "v" for i in range(8)})
    msg = driver.message(many)
    assert len(msg["MessageAttributes"]) == 1
    doc = json.loads(msg["MessageBody"])
    assert doc["id"] == many.id and doc["ext7"] == "v" and doc["data"] == {"n": 1}


def test_structured_event_and_s3_key() -> None:
    bytes_event = Event(source="shop", type="a.b", data=b"\xff\x00", datacontenttype="x/y")
    doc = json.loads(structured(bytes_event))
    assert doc["data_base64"] == "/wA=" and doc["datacontenttype"] == "x/y"
    assert attributes(bytes_event)["specversion"] == "1.0"
    url = "s3://k:s@bucket/events/"
    driver = S3Driver(_target(TargetKind.S3, url), url)
    assert (driver.bucket, driver.key(bytes_event)) == (
        "bucket",
        f"events/shop/a/b/{bytes_event.id}.json",
    )


async def test_registry_seals_destination_urls(client: MeshClient) -> None:
    target = Target(
        name="rabbit",
        kind=TargetKind.AMQP,
        url="amqp://guest:pa55word@127.0.0.1:5672/",
        options=DestinationOptions(exchange="events"),
    )
    await client.add_target(target)
    stored = await client.registry.get_target("rabbit")
    assert stored.url == "amqp://guest:***@127.0.0.1:5672/"
    assert stored.url_enc and "pa55word" not in stored.url_enc
    assert "pa55word" not in json.dumps(stored.public())
    assert "url_enc" not in stored.public()
    assert client.registry.destination_url(stored) == "amqp://guest:pa55word@127.0.0.1:5672/"


async def test_cli_destination_flags(settings: Settings, client: MeshClient) -> None:
    p = ok(
        await run_cli(
            settings,
            "target",
            "add",
            "rabbit",
            "--amqp",
            "amqp://guest:pa55word@127.0.0.1:5672/",
            "--exchange",
            "events",
            "--routing-key",
            "mesh.{type}",
        )
    )
    assert "pa55word" not in p.stdout + p.stderr
    listed = ok(await run_cli(settings, "target", "list", "--json"))
    doc = {t["name"]: t for t in json.loads(listed.stdout)}
    assert doc["rabbit"]["kind"] == "amqp"
    assert doc["rabbit"]["options"]["routing_key"] == "mesh.{type}"
    assert "pa55word" not in listed.stdout
    bad = await run_cli(settings, "target", "add", "m", "--mqtt", "mqtt://h", "--exchange", "x")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["mesh: error: --exchange is for --amqp targets"]


async def test_redis_batch_is_one_pipeline_with_a_result_each() -> None:
    url = server_url("redis")
    from redis.asyncio import Redis

    from services.egress.drivers.redis_streams import RedisDriver

    target = _target(TargetKind.REDIS, url, stream="mesh-test-batch-{subject}")
    driver = RedisDriver(target, url)
    events = [_event(subject=f"s{i % 2}") for i in range(9)] + [_event()]  # the last: no subject
    admin = Redis.from_url(url)
    try:
        results = await driver.send_batch(events)
        assert [r.ok for r in results] == [True] * 9 + [False]
        assert results[-1].permanent and "cannot fill" in (results[-1].error or "")
        got = await admin.xrange("mesh-test-batch-s0") + await admin.xrange("mesh-test-batch-s1")
        assert sorted(f[b"id"].decode() for _, f in got) == sorted(e.id for e in events[:9])
    finally:
        await driver.close()
        await admin.delete("mesh-test-batch-s0", "mesh-test-batch-s1")
        await admin.aclose()


@pytest.fixture(scope="module")
def moto() -> object:
    with moto_server() as server:
        yield server


async def test_sqs_batch_sends_by_tens(moto: MotoServer) -> None:
    async with aws_client("sqs", moto.url) as sqs:
        queue = (await sqs.create_queue(QueueName="batch"))["QueueUrl"]
        url = queue.replace("http://", "http://testing:testing-secret@")
        driver = SqsDriver(_target(TargetKind.SQS, url), url)
        events = [_event() for _ in range(23)]
        try:
            results = await driver.send_batch(events)
        finally:
            await driver.close()
        assert all(r.ok for r in results) and len(results) == 23
        seen: list[str] = []
        while len(seen) < 23:
            answer = await sqs.receive_message(
                QueueUrl=queue, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
            )
            seen += [m["MessageAttributes"]["ce-id"]["StringValue"] for m in answer["Messages"]]
        assert sorted(seen) == sorted(e.id for e in events)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from mesh.cli._destinations import pick_destination
    from mesh.destinations import missing_extra

    assert missing_extra("amqp") is None  # the test extra installs every driver
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "aio_pika" else real(name)
    )
    line = "the amqp driver needs aio_pika: pip install 'mesh[amqp]'"
    assert missing_extra("amqp") == line
    with pytest.raises(ValidationError, match=r"pip install 'mesh\[amqp\]'"):
        pick_destination({"amqp": "amqp://h/"}, {"exchange": "x"})
    assert pick_destination({"mqtt": "mqtt://h"}, {})[0] == "mqtt"  # type: ignore[index]


async def test_api_creates_destination_targets_sealed(
    settings: Settings, client: MeshClient
) -> None:
    from tests.support.api import Http, api_running, make_key

    _, admin = await make_key(client, "admin")
    body = {
        "name": "rabbit",
        "kind": "amqp",
        "url": "amqp://guest:pa55word@127.0.0.1:5672/",
        "options": {"exchange": "events", "routing_key": "{source}.{type}"},
    }
    async with api_running(settings) as api, Http(api.url) as http:
        status, _, created = await http.call("POST", "/v1/targets", body, key=admin)
        assert status == 201, created
        assert created["url"] == "amqp://guest:***@127.0.0.1:5672/"
        assert "url_enc" not in created and "pa55word" not in json.dumps(created)
        status, _, bad = await http.call(
            "POST", "/v1/targets", {**body, "name": "r2", "options": {}}, key=admin
        )
        assert status == 422 and "exchange" in bad["detail"]
        status, _, bad = await http.call(
            "PATCH", "/v1/targets/rabbit", {"url": "http://example.com/"}, key=admin
        )
        assert status == 422, bad
    stored = await client.registry.get_target("rabbit")
    assert client.registry.destination_url(stored).endswith("pa55word@127.0.0.1:5672/")
    assert stored.options is not None and stored.options.routing_key == "{source}.{type}"


@pytest.mark.parametrize(
    ("code", "status", "permanent"),
    [
        ("NoSuchBucket", 404, True),  # S3 bucket missing
        ("AWS.SimpleQueueService.NonExistentQueue", 400, True),  # SQS queue missing
        ("AccessDenied", 403, True),
        ("InvalidParameterValue", 400, True),
        ("Throttling", 400, False),  # SQS throttling: retry
        ("RequestThrottled", 403, False),
        ("SlowDown", 503, False),  # S3 throttling
        ("InternalError", 500, False),
        ("ServiceUnavailable", 503, False),
        ("TooManyRequests", 429, False),
        ("RequestTimeout", 400, False),
    ],
)
def test_aws_failures_end_in_retry_or_dead_letter(code: str, status: int, permanent: bool) -> None:
    from botocore.exceptions import ClientError

    url = "s3://k:s@bucket/events"
    driver = S3Driver(_target(TargetKind.S3, url), url)
    error = ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )
    assert driver.is_permanent(error) is permanent
    assert not driver.drops_connection(error)  # an answer keeps the client


def test_redis_failures_end_in_retry_or_dead_letter() -> None:
    from redis.exceptions import (
        ConnectionError,
        NoPermissionError,
        OutOfMemoryError,
        ReadOnlyError,
        ResponseError,
    )

    from services.egress.drivers.redis_streams import RedisDriver

    url = "redis://127.0.0.1:6379/0"
    driver = RedisDriver(_target(TargetKind.REDIS, url), url)
    for retry in (OutOfMemoryError("OOM"), ReadOnlyError("READONLY"), ConnectionError("cut")):
        assert not driver.is_permanent(retry), retry
    for dead in (NoPermissionError("NOPERM"), ResponseError("WRONGTYPE Operation against a key")):
        assert driver.is_permanent(dead), dead


def test_kafka_failures_end_in_retry_or_dead_letter() -> None:
    from aiokafka import errors

    from services.egress.drivers.kafka import KafkaDriver, LoginRefused, UnknownTopic

    url = "kafka://127.0.0.1:9092"
    driver = KafkaDriver(_target(TargetKind.KAFKA, url), url)
    for retry in (
        errors.KafkaConnectionError("cut"),
        errors.KafkaTimeoutError(),
        errors.NotLeaderForPartitionError(),
        errors.NotEnoughReplicasError(),
        errors.RequestTimedOutError(),
        errors.UnknownTopicOrPartitionError(),  # the producer's metadata wait: maybe a cut
        errors.LeaderNotAvailableError(),
        # A refused login: the target's credentials, not the event's (the breaker waits).
        errors.SaslAuthenticationFailed(),
        LoginRefused("SASL SCRAM-SHA-256 login as 'svc' refused"),
    ):
        assert not driver.is_permanent(retry), retry
    for dead in (
        UnknownTopic("gone"),
        errors.MessageSizeTooLargeError(),
        errors.RecordListTooLargeError(),
        errors.InvalidTopicError(),
        errors.TopicAuthorizationFailedError(),
    ):
        assert driver.is_permanent(dead), dead
    # A broker's answer keeps the producer; a cut or an expired batch makes a new one.
    assert not driver.drops_connection(errors.MessageSizeTooLargeError())
    assert driver.drops_connection(errors.KafkaConnectionError("cut"))
    assert driver.drops_connection(errors.KafkaTimeoutError())
