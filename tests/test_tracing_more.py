"""Tracing beyond one delivery (issue #21): request/reply as one trace (client span,
server span, the reply's context), log lines of a real egress carrying the attempt's ids,
bridge publishes continuing a client's trace, and the attributes of every destination
kind's attempt span holding no secret, path token, query or payload."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog

from mesh import tracing
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.envelope import Event
from mesh.logs import configure_logging
from mesh.registry import Target, TargetKind
from services.egress.service import WebhookEgress
from tests.conftest import add_nats_target
from tests.support import eventually
from tests.support.otlp import OtlpReceiver, tracing_to_receiver
from tests.support.receiver import Receiver, add_webhook

CANARY = "PAYLOAD-CANARY-77aa"
SECRET = "pw-Secr3t-9f"
KIND_SERVER, KIND_CLIENT, KIND_PRODUCER = 2, 3, 4
# Sampled: the flags' bit 0 (the SDK may set bit 1, "random trace id", too).
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[13]$")


@pytest.fixture
async def otlp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OtlpReceiver]:
    async with tracing_to_receiver(monkeypatch) as rx:
        yield rx


@pytest.fixture
def log_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], list[dict]]]:
    """JSON log lines of this process so far, as a service writes them (mesh.logs)."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("json", "info")
    seen: list[dict] = []

    def read() -> list[dict]:
        text = capsys.readouterr().err
        seen.extend(json.loads(line) for line in text.splitlines() if line.startswith("{"))
        return seen

    yield read
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def _no_secrets(otlp: OtlpReceiver, *secrets: str) -> None:
    for body in otlp.raw:
        for secret in secrets:
            assert secret.encode() not in body, secret


async def test_request_reply_is_one_trace(
    otlp: OtlpReceiver, client: MeshClient, log_lines: Callable[[], list[dict]]
) -> None:
    await add_nats_target(client, "a")
    await add_nats_target(client, "b")
    await client.add_propagation("bidirectional", "a", ["b"])
    seen: list[dict[str, str]] = []

    async def answer(event: Event) -> dict[str, bool]:
        structlog.get_logger("mesh.test").info("answering", target="b")
        seen.append(dict(event.extensions))
        return {"ok": True}

    sub = await client.serve_requests("b", answer)
    try:
        reply = await client.request("a", "b", "price.get", {"card": CANARY}, timeout=5)
    finally:
        await sub.unsubscribe()
    assert reply.status == 200 and reply.data == {"ok": True}
    await asyncio.to_thread(tracing.flush)

    (req,) = [s for s in otlp.spans if s.name == "request b"]
    (srv,) = [s for s in otlp.spans if s.name == "serve b"]
    assert (req.kind, srv.kind) == (KIND_CLIENT, KIND_SERVER)
    assert req.parent_id == "" and (srv.trace_id, srv.parent_id) == (req.trace_id, req.span_id)
    assert req.attributes["mesh.reply.status"] == srv.attributes["mesh.reply.status"] == 200
    assert req.attributes["messaging.destination.name"] == "mesh.rpc.b.price.get"
    # The request carried the client span's context; the reply, the server span's.
    assert TRACEPARENT.match(seen[0]["traceparent"]).groups() == (req.trace_id, req.span_id)
    m = TRACEPARENT.match(reply.headers["ce-traceparent"])
    assert m is not None and m.groups() == (srv.trace_id, srv.span_id)
    # The handler's log line carries the server span's ids.
    (line,) = [d for d in log_lines() if d["event"] == "answering"]
    assert (line["trace_id"], line["span_id"]) == (srv.trace_id, srv.span_id)
    _no_secrets(otlp, CANARY)


async def test_a_failing_handler_is_an_error_span(otlp: OtlpReceiver, client: MeshClient) -> None:
    await add_nats_target(client, "a")
    await add_nats_target(client, "b")
    await client.add_propagation("bidirectional", "a", ["b"])

    async def boom(event: Event) -> None:
        raise RuntimeError(CANARY)

    sub = await client.serve_requests("b", boom)
    try:
        reply = await client.request("a", "b", "x", timeout=5)
    finally:
        await sub.unsubscribe()
    assert reply.status == 500
    await asyncio.to_thread(tracing.flush)
    (req,) = [s for s in otlp.spans if s.name == "request b"]
    (srv,) = [s for s in otlp.spans if s.name == "serve b"]
    assert srv.status_code == req.status_code == 2  # ERROR
    assert srv.attributes["error.type"] == "500"
    _no_secrets(otlp, CANARY)


async def test_webhook_request_reply_is_one_trace(
    otlp: OtlpReceiver, settings: Settings, client: MeshClient
) -> None:
    async with Receiver() as rx:
        await client.add_target(Target(name="app", kind=TargetKind.NATS))
        secret = await add_webhook(client, "hook", rx.url, source="other")
        await client.add_propagation("bidirectional", "app", ["hook"])
        egress = WebhookEgress(settings, fetch_expires_s=0.5)
        await egress.start()
        try:
            await eventually(lambda: "hook" in egress.workers and egress.workers["hook"].rpc.sub)
            reply = await client.request("app", "hook", "price.get", {"card": CANARY}, timeout=5)
        finally:
            await egress.stop()
    assert reply.status == 200
    await asyncio.to_thread(tracing.flush)
    (req,) = [s for s in otlp.spans if s.name == "request hook"]
    (srv,) = [s for s in otlp.spans if s.name == "serve hook"]
    (post,) = [s for s in otlp.spans if s.kind == KIND_CLIENT and s.name.startswith("POST ")]
    assert (srv.parent_id, post.parent_id) == (req.span_id, srv.span_id)
    assert {req.trace_id, srv.trace_id, post.trace_id} == {req.trace_id}
    assert post.attributes["http.response.status_code"] == 200
    # The receiver continues the POST's span; the reply names the server span.
    (got,) = rx.requests
    assert TRACEPARENT.match(got.headers["traceparent"]).groups() == (post.trace_id, post.span_id)
    m = TRACEPARENT.match(reply.headers["ce-traceparent"])
    assert m is not None and m.groups() == (srv.trace_id, srv.span_id)
    _no_secrets(otlp, CANARY, secret, secret.removeprefix("whsec_"))


async def test_egress_log_lines_carry_the_attempts_ids(
    otlp: OtlpReceiver, settings: Settings, client: MeshClient, log_lines: Callable[[], list[dict]]
) -> None:
    async with Receiver() as rx:
        rx.fail_first(1, status=503)
        await add_webhook(client, "hook", rx.url)
        egress = WebhookEgress(settings, fetch_expires_s=0.5)
        await egress.start()
        try:
            event_id = await client.publish("shop", "a.b", {"card": CANARY})
            await rx.wait_for(2)
        finally:
            await egress.stop()
    await asyncio.to_thread(tracing.flush)
    (first,) = [
        s
        for s in otlp.spans
        if s.kind == KIND_CLIENT and s.attributes.get("mesh.delivery.attempt") == 1
    ]
    retry = [
        d
        for d in log_lines()
        if d["event"] == "delivery failed, will retry" and d.get("event_id") == event_id
    ]
    assert retry, log_lines()[-20:]
    assert (retry[0]["trace_id"], retry[0]["span_id"]) == (first.trace_id, first.span_id)
    # Off the attempt (no span active), no ids are made up.
    assert all("trace_id" not in d for d in log_lines() if "event_id" not in d)


def test_every_destination_kinds_attempt_span_keeps_no_secret() -> None:
    """The attempt span of each kind, from a URL with user, password, path tokens and a
    query: server address and template only (the SDK's own in-memory exporter)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from mesh.destinations import redact
    from services.egress.spans import SYSTEMS, start_attempt

    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=tracing._id_generator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    urls = {
        "webhook": f"https://user:{SECRET}@hooks.example.com/in/Tk{SECRET}?sig={SECRET}",
        "amqp": f"amqp://guest:{SECRET}@rabbit.example.com:5672/vh{SECRET}?heartbeat={SECRET}",
        "mqtt": f"mqtts://user:{SECRET}@mqtt.example.com:8883/?token={SECRET}",
        "redis": f"rediss://:{SECRET}@redis.example.com:6380/0?password={SECRET}",
        "sqs": f"https://sqs.example.com/123456789012/Q{SECRET}?X-Amz-Signature={SECRET}",
        "s3": f"s3://bucket-a/{SECRET}?secret={SECRET}",
    }
    event = Event(source="shop", type="a.b", data={"card": CANARY})
    old, tracing.TRACER = tracing.TRACER, provider.get_tracer("t")
    try:
        for kind, url in urls.items():
            # The worker sees the registry's URL: redacted for non-HTTP kinds; try both.
            for shown in {url, redact(url)}:
                span = start_attempt("t1", event, 2, shown, kind)
                span.end()
    finally:
        tracing.TRACER = old
    spans = exporter.get_finished_spans()
    assert len(spans) >= len(urls)
    for span in spans:
        text = repr(dict(span.attributes)) + span.name
        assert SECRET not in text and CANARY not in text and "guest" not in text, text
        assert "url.full" not in span.attributes
        assert len(span.links) == 1  # attempt 2 links to attempt 1
    by_kind = {s.attributes.get("messaging.system", "http"): s for s in spans}
    assert set(by_kind) == {"http", *SYSTEMS.values()}
    assert by_kind["http"].name == "POST /in/{}"
    assert by_kind["rabbitmq"].attributes["server.address"] == "rabbit.example.com"
    assert by_kind["rabbitmq"].name == "send t1"
    provider.shutdown()


def test_attempt_ids_are_stable_and_distinct() -> None:
    e = Event(source="s", type="t")
    assert tracing.attempt_ids(e, "a", 1) == tracing.attempt_ids(e, "a", 1)
    assert tracing.attempt_ids(e, "a", 1)[1] != tracing.attempt_ids(e, "a", 2)[1]
    assert tracing.attempt_ids(e, "a", 1)[1] != tracing.attempt_ids(e, "b", 1)[1]
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    e.extensions["traceparent"] = parent
    trace_id, _ = tracing.attempt_ids(e, "a", 1)
    assert trace_id == int("0af7651916cd43dd8448eb211c80319c", 16)
    replayed = Event(source="s", type="t", id=e.id)
    replayed.extensions["traceparent"] = parent.replace("b7ad6b7169203331", "1111111111111111")
    assert tracing.attempt_ids(replayed, "a", 1) != tracing.attempt_ids(e, "a", 1)


@pytest.fixture(scope="module")
def moto() -> Iterator[Any]:
    from tests.support.destinations import moto_server

    with moto_server() as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["amqp", "mqtt", "redis", "sqs", "s3"])
async def test_each_destination_kind_is_a_producer_span_without_secrets(
    kind: str,
    request: pytest.FixtureRequest,
    otlp: OtlpReceiver,
    settings: Settings,
    client: MeshClient,
) -> None:
    """A real delivery to each kind's real system (moto for SQS/S3): a ``send`` span under
    the publish span, naming the system and host; no URL credential or data exported."""
    from urllib.parse import urlsplit

    from services.egress.spans import SYSTEMS
    from tests.support.destinations import AWS_SECRET
    from tests.test_destinations import add_target, destination

    async with destination(kind, request) as d:
        await add_target(client, "dest", d)
        egress = WebhookEgress(settings, fetch_expires_s=0.5)
        await egress.start()
        try:
            event_id = await client.publish("shop", "order.created", {"card": CANARY})
            await eventually(lambda: _arrived(d, event_id), 60, "the event at " + kind)
        finally:
            await egress.stop()
    await asyncio.to_thread(tracing.flush)
    (pub,) = [s for s in otlp.spans if s.name == "publish shop"]
    assert pub.attributes["cloudevents.event_id"] == event_id
    sends = sorted(
        (s for s in otlp.spans if s.name == "send dest"),
        key=lambda s: s.attributes["mesh.delivery.attempt"],
    )  # a loaded machine may time the first attempt out: then a linked retry follows
    assert sends and sends[-1].status_code != 2, [s.attributes for s in sends]
    for send in sends:
        assert (send.kind, send.trace_id) == (KIND_PRODUCER, pub.trace_id)
        assert send.parent_id == pub.span_id
        assert send.attributes["messaging.system"] == SYSTEMS[kind]
        assert send.attributes["server.address"] == "127.0.0.1" or kind == "s3"
    for before, retry in itertools.pairwise(sends):
        assert retry.links == [(pub.trace_id, before.span_id)]
    secrets = [CANARY, AWS_SECRET]
    password = urlsplit(d.url).password
    if password:
        secrets.append(password)
    _no_secrets(otlp, *secrets)


async def _arrived(d: Any, event_id: str) -> bool:
    await d.poll()
    return event_id in d.received.ids


async def test_an_attempt_the_sampler_drops_builds_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sampling at 0 %: a root attempt (an event without a context) and an event whose
    context says "not sampled" get no span and no header; at 100 % both get one."""
    from services.egress.spans import begin_attempt

    root = Event(source="shop", type="a.b")
    unsampled = Event(source="shop", type="a.b")
    unsampled.extensions["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    async with tracing_to_receiver(monkeypatch):
        assert begin_attempt("t", root, 1, "http://h/x", "webhook") == (None, None)
        span, headers = begin_attempt("t", unsampled, 1, "http://h/x", "webhook")
        assert span is None  # the event's own context is passed on, as when off
        assert headers == {"traceparent": unsampled.extensions["traceparent"]}
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
    async with tracing_to_receiver(monkeypatch):
        span, headers = begin_attempt("t", root, 1, "http://h/x", "webhook")
        assert span is not None and span.is_recording()
        assert TRACEPARENT.match(headers["traceparent"])
        span.end()
