"""OpenTelemetry traces end to end: a real OTLP/HTTP receiver (decoding with the official
protobuf messages), real nats-server, real webhook receivers, the real egress and sink."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh import tracing
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.envelope import Event
from services.egress.service import WebhookEgress
from services.sink.service import Sink
from tests.conftest import env_for
from tests.support import eventually
from tests.support.cli import mesh, ok
from tests.support.otlp import OtlpReceiver, tracing_to_receiver
from tests.support.receiver import Receiver, add_webhook, delivery_records

ROOT = Path(__file__).resolve().parent.parent
CANARY = "PAYLOAD-CANARY-5e1d"
PATH_TOKEN = "Zq81tokenXYZ"  # a secret hiding in a webhook URL's path
SPAN_KIND_PRODUCER, SPAN_KIND_CLIENT = 4, 3
STATUS_ERROR = 2
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@pytest.fixture
async def otlp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OtlpReceiver]:
    async with tracing_to_receiver(monkeypatch) as rx:
        yield rx


async def test_one_trace_from_publish_to_every_delivery_and_the_sink(
    otlp: OtlpReceiver, settings: Settings, client: MeshClient, tmp_path: Path
) -> None:
    async with (
        Receiver() as ra,
        Receiver(path=f"/hooks/{PATH_TOKEN}?key={PATH_TOKEN}") as rb,
        Receiver() as rc,
    ):
        rc.fail_first(2, status=503)
        secrets = [
            await add_webhook(client, "ta", ra.url),
            await add_webhook(client, "tb", rb.url),
            await add_webhook(client, "tc", rc.url),
        ]
        egress = WebhookEgress(settings, fetch_expires_s=0.5)
        sink_settings = settings.model_copy(update={"db_url": f"sqlite:///{tmp_path / 'm.db'}"})
        sink = Sink(sink_settings, batch_size=100, fetch_wait=0.2)
        await egress.start()
        await sink.start()
        try:
            event_id = await client.publish("shop", "order.created", {"card": CANARY})
            await ra.wait_for(1)
            await rb.wait_for(1)
            await rc.wait_for(3)
            await eventually(lambda: sink.counts["events"] >= 1)
            records = await eventually(lambda: _records(client, "tc", 3), timeout=15)
            await eventually(lambda: sink.counts["deliveries"] >= 5, timeout=15)
        finally:
            await egress.stop()
            await sink.stop()
        await asyncio.to_thread(tracing.flush)

    (pub,) = [
        s
        for s in otlp.spans
        if s.kind == SPAN_KIND_PRODUCER and s.attributes.get("cloudevents.event_id") == event_id
    ]
    trace_id = pub.trace_id
    assert pub.parent_id == "" and pub.name == "publish shop"
    assert pub.attributes["messaging.destination.name"] == "mesh.evt.shop.order.created"
    spans = otlp.trace(trace_id)

    attempts = [s for s in spans if s.kind == SPAN_KIND_CLIENT]
    assert all(s.parent_id == pub.span_id for s in attempts), "each attempt under the publish"
    got = sorted(
        (
            s.attributes["mesh.target"],
            s.attributes.get("http.request.resend_count", 0),
            s.attributes["http.response.status_code"],
            s.status_code == STATUS_ERROR,
        )
        for s in attempts
    )
    assert got == [
        ("ta", 0, 200, False),
        ("tb", 0, 200, False),
        ("tc", 0, 503, True),
        ("tc", 1, 503, True),
        ("tc", 2, 200, False),
    ]
    for s in attempts:
        assert s.attributes["http.request.method"] == "POST"
        assert s.attributes["server.address"] == "127.0.0.1"
        assert s.attributes["cloudevents.event_id"] == event_id
        assert "url.full" not in s.attributes
    # A retry is a new span in the same trace, linked to the previous attempt's span.
    tc_spans = sorted(
        (s for s in attempts if s.attributes["mesh.target"] == "tc"),
        key=lambda s: s.attributes["mesh.delivery.attempt"],
    )
    assert [s.attributes["mesh.delivery.attempt"] for s in tc_spans] == [1, 2, 3]
    assert tc_spans[0].links == []
    for before, retry in itertools.pairwise(tc_spans):
        assert retry.links == [(trace_id, before.span_id)]
        assert retry.trace_id == trace_id and retry.span_id != before.span_id
    assert all(s.links == [] for s in attempts if s.attributes["mesh.target"] != "tc")
    (b_span,) = [s for s in attempts if s.attributes["mesh.target"] == "tb"]
    assert b_span.attributes["url.template"] == "/hooks/{}"
    assert b_span.name == "POST /hooks/{}"

    (stored,) = [s for s in spans if s.name == "sink write events"]
    assert stored.parent_id == pub.span_id
    assert stored.attributes["db.system.name"] == "sqlite"

    # Every request carried a valid traceparent: the publisher's trace, the attempt's span.
    by_id = {s.span_id: s for s in attempts}
    for name, rx in (("ta", ra), ("tb", rb), ("tc", rc)):
        for req in rx.requests:
            m = TRACEPARENT.match(req.headers["traceparent"])
            assert m is not None, req.headers["traceparent"]
            assert m.group(1) == trace_id
            assert int(m.group(3), 16) & 1, "sampled"
            assert by_id[m.group(2)].attributes["mesh.target"] == name
    assert len({TRACEPARENT.match(r.headers["traceparent"]).group(2) for r in rc.requests}) == 3

    # Delivery records carry the trace id (what `mesh trace` shows without a back end).
    assert {r.trace_id for r in records} == {trace_id}

    # No payload, secret or URL token in anything exported.
    for body in otlp.raw:
        assert CANARY.encode() not in body
        assert PATH_TOKEN.encode() not in body
        for secret in secrets:
            assert secret.encode() not in body
            assert secret.removeprefix("whsec_").encode() not in body

    # `mesh trace` tells the same story from the sink's tables.
    env = {k: v for k, v in env_for(sink_settings).items() if not k.startswith("OTEL_")}
    doc = json.loads(ok(await mesh(env, "trace", event_id, "--json")).stdout)
    assert doc["trace_ids"] == [trace_id]
    assert doc["event"]["source"] == "shop" and doc["event"]["stored"]
    story = {
        t["target"]: [(a["attempt"], a["outcome"]) for a in t["attempts"]] for t in doc["targets"]
    }
    assert story == {
        "ta": [(1, "delivered")],
        "tb": [(1, "delivered")],
        "tc": [(1, "retry"), (2, "retry"), (3, "delivered")],
    }
    text = ok(await mesh(env, "trace", event_id)).stdout
    assert trace_id in text and "tc  delivered after 3 attempts" in text
    assert "#2  retry  HTTP 503" in text
    missing = await mesh(env, "trace", "no-such-event")
    assert missing.returncode == 1 and "no event 'no-such-event'" in missing.stderr
    assert "Traceback" not in missing.stderr

    # The Prometheus families went out as OTLP metrics too.
    await eventually(lambda: "mesh_deliveries_total" in otlp.metric_names, timeout=10)
    assert "mesh_delivery_latency_seconds_count" in otlp.metric_names


async def _records(client: MeshClient, target: str, n: int) -> list | None:
    recs = await delivery_records(client, target)
    return recs if len(recs) >= n else None


async def test_log_lines_carry_the_active_span(otlp: OtlpReceiver) -> None:
    event = Event(source="shop", type="a.b")
    span = tracing.publish_span(event, "mesh.evt.shop.a.b")
    assert tracing.add_log_ids(None, "info", {}) == {}
    with tracing.current(span):
        doc = tracing.add_log_ids(None, "info", {"event": "x"})
    tracing.end_span(span)
    ctx = span.get_span_context()
    assert doc["trace_id"] == format(ctx.trace_id, "032x") == tracing.trace_id_of(event)
    assert doc["span_id"] == format(ctx.span_id, "016x")


async def test_off_passes_the_event_context_through(settings: Settings, client: MeshClient) -> None:
    assert tracing.TRACER is None
    async with Receiver() as rx:
        await add_webhook(client, "hook", rx.url)
        egress = WebhookEgress(settings, fetch_expires_s=0.5)
        await egress.start()
        try:
            parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            event = client.build("shop", "a.b", {"n": 1})
            event.extensions["traceparent"] = parent
            event.extensions["tracestate"] = "vendor=1"
            await client.publish_event(event)
            await client.publish("shop", "a.b", {"n": 2})  # no context: no header
            await rx.wait_for(2)
        finally:
            await egress.stop()
    by_n = {r.json()["data"]["n"]: r.headers for r in rx.requests}
    assert by_n[1]["traceparent"] == parent
    assert by_n[1]["tracestate"] == "vendor=1"
    assert "traceparent" not in by_n[2]
    records = await delivery_records(client, "hook")
    assert sorted(str(r.trace_id) for r in records) == [
        "0af7651916cd43dd8448eb211c80319c",
        "None",
    ]


def test_off_imports_no_opentelemetry() -> None:
    """Off means no OpenTelemetry module is even imported (a fresh interpreter)."""
    code = (
        "import sys, mesh.client, services.egress.service, services.sink.service;"
        "from mesh import tracing; assert not tracing.configure();"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_url_template_keeps_no_token() -> None:
    template, attrs = tracing.url_template("https://u:pw@hooks.example.com/services/T0/B0/xXyY?k=v")
    assert template == "/services/{}/{}/{}"
    assert attrs["server.address"] == "hooks.example.com"
    assert attrs["server.port"] == 443
    assert "pw" not in repr(attrs)
    assert tracing.url_template("http://h:8080/")[0] == "/"


def test_switch_and_trace_ids() -> None:
    assert not tracing.enabled_by_env({})
    assert tracing.enabled_by_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert tracing.enabled_by_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/t"})
    assert not tracing.enabled_by_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}
    )
    e = Event(source="s", type="t")
    assert tracing.trace_id_of(e) is None
    e.extensions["traceparent"] = "garbage"
    assert tracing.trace_id_of(e) is None
    assert tracing.w3c_headers(e) == {}


async def test_http_api_publish_continues_the_callers_trace(
    otlp: OtlpReceiver, settings: Settings, client: MeshClient
) -> None:
    from mesh.apikeys import Scope
    from tests.support.api import Http, api_running, make_key

    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with api_running(settings) as api, Http(api.url) as http:
        _, key = await make_key(client, Scope.PUBLISH)
        status, _, doc = await http.call(
            "POST",
            "/v1/events",
            {"source": "shop", "type": "order.created", "data": {"card": CANARY}},
            key=key,
            headers={"traceparent": caller, "tracestate": "rojo=00f067aa0ba902b7"},
        )
        assert status == 202, doc
        status, _, bad = await http.call(
            "POST",
            "/v1/events",
            {"source": "shop", "type": "order.created"},
            key=key,
            headers={"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
        )
        assert status == 202, bad
    await asyncio.to_thread(tracing.flush)
    (pub,) = [s for s in otlp.spans if s.attributes.get("cloudevents.event_id") == doc["id"]]
    assert (pub.trace_id, pub.parent_id) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
    )
    # An invalid caller context is ignored: that publish starts a trace of its own.
    (own,) = [s for s in otlp.spans if s.attributes.get("cloudevents.event_id") == bad["id"]]
    assert own.parent_id == "" and own.trace_id != "0" * 32
    for body in otlp.raw:
        assert CANARY.encode() not in body


def test_bridge_frames_carry_the_events_trace_context() -> None:
    from services.bridge.frames import event_frame

    event = Event(source="shop", type="a.b", data={"n": 1})
    assert "traceparent" not in event_frame(event, 1)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event.extensions.update({"traceparent": parent, "tracestate": "v=1"})
    frame = event_frame(event, 2)
    assert (frame["traceparent"], frame["tracestate"], frame["seq"]) == (parent, "v=1", 2)


async def test_replay_is_a_span_in_the_events_trace(otlp: OtlpReceiver, client: MeshClient) -> None:
    from mesh.registry import Target, TargetKind
    from mesh.replay import replay
    from tests.support.receiver import read_stream

    await client.add_target(Target(name="alpha", kind=TargetKind.NATS))
    await client.add_propagation("unidirectional", "shop", ["alpha"])
    event_id = await client.publish("shop", "order.created", {"card": CANARY})
    result = await replay(client, "alpha", None, from_seq=1)
    assert result.published == 1
    await asyncio.to_thread(tracing.flush)
    (pub,) = [s for s in otlp.spans if s.name == "publish shop"]
    (rep,) = [s for s in otlp.spans if s.name == "replay alpha"]
    assert (rep.trace_id, rep.parent_id) == (pub.trace_id, pub.span_id)
    assert rep.attributes["cloudevents.event_id"] == event_id
    msgs = await read_stream(client, client.names.events)
    replayed = [m for m in msgs if m.subject.startswith("mesh.replay.")]
    assert replayed[0].headers["ce-traceparent"].split("-")[1:3] == [rep.trace_id, rep.span_id]


async def test_otlp_grpc_export(monkeypatch: pytest.MonkeyPatch, client: MeshClient) -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from mesh.broker import free_port

    names: list[str] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        async def Export(self, request, context):
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    names.extend(s.name for s in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        await asyncio.to_thread(tracing.shutdown)
        assert tracing.configure("mesh-test")
        await client.publish("shop", "order.created", {"n": 1})
        await asyncio.to_thread(tracing.flush)
        assert names == ["publish shop"]
    finally:
        await asyncio.to_thread(tracing.shutdown)
        await server.stop(None)
