"""Logging, redaction, heartbeat tracking, the delivery window and the textfile writer.

Pure logic is driven with a fake clock; the textfile test runs the real runner
against a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from mesh.config import Settings
from mesh.observability import (
    METRICS,
    REDACTED,
    DeliveryWindow,
    Heartbeat,
    HeartbeatInfo,
    ServiceTracker,
    configure_logging,
    delivery_logger,
    redact,
    resolve_format,
    scrub_text,
    worst_circuit,
    write_textfile,
)

SECRET = "whsec_c2VjcmV0LXNob3VsZC1uZXZlci1sZWFr"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Redaction ---------------------------------------------------------------------


def test_redact_replaces_sensitive_keys_at_any_depth() -> None:
    doc = {
        "target": "billing",
        "secret": SECRET,
        "webhook_secret": "x",
        "auth_token": "y",
        "payload": {"card": "4111"},
        "nested": {"headers": {"Authorization": "Bearer abcdefghijkl"}, "ok": 1},
        "items": [{"password": "pw"}, "plain"],
    }
    out = redact(doc)
    assert out["target"] == "billing"
    for key in ("secret", "webhook_secret", "auth_token", "payload"):
        assert out[key] == REDACTED
    assert out["nested"]["headers"]["Authorization"] == REDACTED
    assert out["nested"]["ok"] == 1
    assert out["items"] == [{"password": REDACTED}, "plain"]
    assert "4111" not in json.dumps(out)


def test_scrub_masks_secret_shapes_inside_text() -> None:
    text = (
        f"signing with {SECRET} for postgresql://mesh:hunter2@db:5432/mesh,"
        " header Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig"
    )
    out = scrub_text(text)
    assert SECRET not in out and "hunter2" not in out and "eyJhbGciOiJIUzI1NiJ9" not in out
    assert "whsec_[redacted]" in out
    assert "postgresql://mesh:[redacted]@db:5432/mesh" in out
    assert "Bearer [redacted]" in out
    # Ordinary text is left alone.
    assert (
        scrub_text("delivered evt-1 to billing in 12 ms") == "delivered evt-1 to billing in 12 ms"
    )


def test_bytes_are_described_not_logged() -> None:
    assert redact({"raw": b"card=4111"}) == {"raw": "<9 bytes>"}


# configure_logging ---------------------------------------------------------------


def test_json_lines_with_bound_delivery_fields_and_no_secrets(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "debug")
    log = delivery_logger(structlog.get_logger("mesh.test"), "evt-42", "billing", 3)
    log.info("delivery failed", status=500, secret=SECRET, data={"card": "4111"})
    log.warning(f"retrying with {SECRET}")
    out = lines(capsys.readouterr().err)
    assert len(out) == 2
    first = out[0]
    assert first["event"] == "delivery failed"
    assert first["event_id"] == "evt-42" and first["target"] == "billing" and first["attempt"] == 3
    assert first["level"] == "info" and first["logger"] == "mesh.test"
    assert first["secret"] == REDACTED and first["data"] == REDACTED
    assert "timestamp" in first
    assert out[1]["attempt"] == 3
    assert SECRET not in json.dumps(out) and "4111" not in json.dumps(out)


def test_logging_follows_stderr_and_survives_a_closed_one(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    configure_logging("json", "info")
    log = structlog.get_logger("mesh.test").bind(target="billing")
    first.close()  # e.g. a test's capture stream, gone after that test
    log.info("dropped, not raised")
    logging.getLogger("lib").warning("dropped too")
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    log.info("written")
    logging.getLogger("lib").warning("also written")
    assert [d["event"] for d in lines(second.getvalue())] == ["written", "also written"]


def test_level_filters(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "warning")
    log = structlog.get_logger("mesh.test")
    log.info("quiet")
    log.warning("loud")
    assert [d["event"] for d in lines(capsys.readouterr().err)] == ["loud"]


def test_stdlib_logs_come_out_as_redacted_json(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")
    logging.getLogger("aiohttp.server").error("handler failed for %s", SECRET)
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        logging.getLogger("some.lib").exception("unexpected")
    out = lines(capsys.readouterr().err)
    assert [d["logger"] for d in out] == ["aiohttp.server", "some.lib"]
    assert out[0]["level"] == "error"
    assert "whsec_[redacted]" in out[0]["event"]
    assert "RuntimeError" in out[1]["exception"]
    assert SECRET not in json.dumps(out)


def test_exceptions_in_structlog_are_text_and_scrubbed(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")
    log = structlog.get_logger("mesh.test")
    try:
        raise ValueError(f"bad secret {SECRET}")
    except ValueError:
        log.exception("failed")
    (doc,) = lines(capsys.readouterr().err)
    assert "ValueError" in doc["exception"] and "Traceback" in doc["exception"]
    assert SECRET not in doc["exception"]


def test_console_format_when_asked(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("console", "info")
    structlog.get_logger("mesh.test").info("hello", target="billing", token="t0ps3cret")
    err = capsys.readouterr().err
    assert "hello" in err and "target" in err and "billing" in err
    assert "t0ps3cret" not in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_auto_format_follows_the_terminal(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as not_a_tty:
        assert resolve_format("auto", not_a_tty) == "json"

    class Tty:
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty()) == "console"  # type: ignore[arg-type]
    assert resolve_format("json", Tty()) == "json"  # type: ignore[arg-type]
    assert resolve_format("nonsense") == "json"


def test_reconfiguring_does_not_duplicate_lines(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("console", "info")
    configure_logging("json", "info")
    logging.getLogger("lib").warning("once")
    assert len(lines(capsys.readouterr().err)) == 1


# Heartbeats ---------------------------------------------------------------------


def info(service: str, instance: str, *, status: str = "ok", **stats: Any) -> HeartbeatInfo:
    return HeartbeatInfo(
        service=service,
        instance=instance,
        at="2026-01-01T00:00:00+00:00",
        started_at="2026-01-01T00:00:00+00:00",
        status=status,
        stats=stats,
        interval=1.0,
    )


def test_heartbeat_parse_is_tolerant_of_extra_fields_and_strict_on_garbage() -> None:
    body = json.dumps({**info("sink", "a").__dict__, "future_field": 1}).encode()
    parsed = HeartbeatInfo.parse(body)
    assert parsed.service == "sink" and parsed.interval == 1.0
    old = {k: v for k, v in info("sink", "a").__dict__.items() if k != "interval"}
    assert HeartbeatInfo.parse(json.dumps(old).encode()).interval == 5.0
    for bad in (b"not json", b"[1]", b'{"service": "x"}', b'{"service": 1, "instance": 2,'):
        with pytest.raises((ValueError, TypeError)):
            HeartbeatInfo.parse(bad)


def test_heartbeat_survives_a_broken_stats_function() -> None:
    def stats() -> dict[str, Any]:
        raise KeyError("oops")

    hb = Heartbeat(None, "mesh.sys.health.x.y", "x", "y", stats, interval=2.0)
    doc = json.loads(hb.payload())
    assert doc["stats"] == {"stats_error": "KeyError"}
    assert doc["interval"] == 2.0 and doc["status"] == "ok"


def test_tracker_marks_stale_after_three_missed_intervals() -> None:
    clock = FakeClock()
    tracker = ServiceTracker(5.0, clock=clock)
    tracker.observe(info("sink", "a"))  # interval 1 s
    tracker.observe(info("health", "b"))
    clock.advance(2.9)
    tracker.observe(info("health", "b"))
    assert {r["instance"]: r["state"] for r in tracker.view()} == {"a": "up", "b": "up"}
    clock.advance(0.2)  # "a" last seen 3.1 s ago: three intervals missed
    rows = {r["instance"]: r for r in tracker.view()}
    assert rows["a"]["state"] == "stale" and rows["a"]["stale"] is True
    assert rows["a"]["age_s"] == pytest.approx(3.1)
    assert rows["b"]["state"] == "up"
    tracker.observe(info("sink", "a"))
    assert {r["instance"]: r["state"] for r in tracker.view()}["a"] == "up"
    assert tracker.counts() == {("sink", "up"): 1, ("health", "up"): 1}


def test_tracker_stopped_instances_are_not_stale_and_are_forgotten() -> None:
    clock = FakeClock()
    tracker = ServiceTracker(clock=clock, forget_stopped_s=30, forget_stale_s=100)
    tracker.observe(info("sink", "a", status="stopped"))
    tracker.observe(info("sink", "b"))
    clock.advance(10)
    assert {r["instance"]: r["state"] for r in tracker.view()} == {"a": "stopped", "b": "stale"}
    clock.advance(25)
    assert [r["instance"] for r in tracker.view()] == ["b"]
    clock.advance(100)
    assert tracker.view() == []


def test_tracker_circuits_from_live_instances_only() -> None:
    clock = FakeClock()
    tracker = ServiceTracker(clock=clock)
    tracker.observe(info("webhook-egress", "e1", circuits={"billing": "open", "crm": "closed"}))
    tracker.observe(info("webhook-egress", "e2", circuits={"billing": "closed"}))
    tracker.observe(info("sink", "s1"))
    assert tracker.circuits() == {
        "billing": {"e1": "open", "e2": "closed"},
        "crm": {"e1": "closed"},
    }
    assert worst_circuit(tracker.circuits()["billing"].values()) == "open"
    assert worst_circuit(["closed", "half_open"]) == "half_open"
    assert worst_circuit([]) is None
    clock.advance(10)  # both egress instances stale: their circuits no longer count
    assert tracker.circuits() == {}


def test_tracker_is_bounded() -> None:
    clock = FakeClock()
    tracker = ServiceTracker(clock=clock, max_instances=3)
    for i in range(5):
        clock.advance(0.01)
        tracker.observe(info("sink", f"i{i}"))
    assert [r["instance"] for r in tracker.view()] == ["i2", "i3", "i4"]


# Delivery window ------------------------------------------------------------------


def test_window_success_rate_throughput_and_failures() -> None:
    clock = FakeClock()
    w = DeliveryWindow(60, rate_window_s=10, max_failures=3, clock=clock)
    for _ in range(8):
        w.observe("billing", "delivered")
    w.observe("billing", "retry", event_id="e1", attempt=1, status_code=503, error="HTTP 503")
    w.observe("billing", "dead", event_id="e2", attempt=5, error=f"gave up {SECRET}" + "x" * 500)
    w.observe("billing", "skipped", event_id="e3")
    w.observe("crm", "delivered")
    clock.advance(1)  # the rate counts whole seconds only
    s = w.summary("billing")
    assert (s["delivered"], s["failed"], s["skipped"], s["attempts"]) == (8, 2, 1, 10)
    assert s["success_rate"] == 0.8
    assert s["delivered_per_s"] == 0.8
    assert w.summary()["delivered"] == 9 and w.summary()["attempts"] == 11
    assert w.summary("nobody")["success_rate"] is None
    failures = w.recent_failures()
    assert [f["event_id"] for f in failures] == ["e2", "e1"]
    assert failures[1]["status_code"] == 503 and failures[1]["outcome"] == "retry"
    assert SECRET not in failures[0]["error"] and len(failures[0]["error"]) <= 200
    assert w.recent_failures(target="crm") == []


def test_window_slides() -> None:
    clock = FakeClock()
    w = DeliveryWindow(30, rate_window_s=5, clock=clock)
    w.observe("t", "delivered")
    w.observe("t", "retry")
    clock.advance(20)
    w.observe("t", "delivered")
    clock.advance(1)
    assert w.summary("t")["attempts"] == 3
    assert w.summary("t")["delivered_per_s"] == pytest.approx(0.2)
    clock.advance(10)  # the first two fell out of the 30 s window
    s = w.summary("t")
    assert (s["delivered"], s["failed"], s["success_rate"]) == (1, 0, 1.0)
    assert s["delivered_per_s"] == 0.0


# Textfile --------------------------------------------------------------------------


def test_write_textfile_is_mesh_only_and_parses(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Counter("mesh_things", "things", ["kind"], registry=registry).labels("a").inc(3)
    Counter("process_other", "not ours", registry=registry).inc()
    path = tmp_path / "metrics" / "mesh.prom"
    write_textfile(path, registry)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    assert "mesh_things" in families and "process_other" not in families
    (sample,) = [s for s in families["mesh_things"].samples if s.name == "mesh_things_total"]
    assert sample.value == 3 and sample.labels == {"kind": "a"}
    assert os.listdir(path.parent) == ["mesh.prom"]  # no temp file left behind


def test_default_textfile_has_no_process_collectors(tmp_path: Path) -> None:
    METRICS.events_published.labels("textfile-test").inc()
    path = tmp_path / "mesh.prom"
    write_textfile(path)
    text = path.read_text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "mesh_client_events_published" in names
    assert all(n.startswith("mesh_") for n in names)
    assert 'mesh_client_events_published_total{source="textfile-test"}' in text


@pytest.mark.slow
async def test_runner_writes_the_textfile_periodically_and_atomically(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import runner

    monkeypatch.setattr(runner, "TEXTFILE_INTERVAL_S", 0.2)
    s = settings.model_copy(update={"http_port": 0})
    # One service in its own process: its own file, every sample labelled with the process.
    path = s.metrics_dir / "mesh-health.prom"
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(runner.run(["health"], s, embedded=False, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        deadline = asyncio.get_running_loop().time() + 20
        while not path.exists():
            assert asyncio.get_running_loop().time() < deadline, "no textfile written"
            await asyncio.sleep(0.05)
        first = path.stat().st_mtime_ns
        METRICS.events_published.labels("runner-textfile").inc(7)
        # Rewritten with the new value, and every version read is whole.
        while 'source="runner-textfile"' not in path.read_text():
            assert asyncio.get_running_loop().time() < deadline, "textfile not rewritten"
            families = list(text_string_to_metric_families(path.read_text()))
            assert families
            await asyncio.sleep(0.05)
        assert path.stat().st_mtime_ns >= first
        text = path.read_text()
        assert (
            'mesh_client_events_published_total{mesh_process="health",source="runner-textfile"} 7.0'
            in text
        )
        assert 'mesh_service_up{mesh_process="health",service="health"} 1.0' in text
        leftovers = [p for p in os.listdir(path.parent) if p != path.name]
        assert not [p for p in leftovers if not p.startswith(path.name + ".")]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    # The final write on the way out records the service as down.
    assert 'mesh_service_up{mesh_process="health",service="health"} 0.0' in path.read_text()
