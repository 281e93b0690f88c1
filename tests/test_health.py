"""The health service over real HTTP, against a real nats-server and real databases.

Readiness follows the broker and the database down and back up; /metrics parses
and carries the mesh_ families after traffic; /status shows lag, circuits,
failures and services, and a SIGKILLed service turns stale; every service
answers ``$SRV.PING``; no log line of a whole mesh run carries a secret or a
payload.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.crypto import KeyRing
from mesh.errors import ConfigError
from mesh.records import DeliveryRecord, Outcome
from mesh.registry import RetryPolicy, Target, TargetKind
from services.base import Service
from services.health.service import Health
from tests import support
from tests.conftest import env_for
from tests.support import migrate, pg_schema, pg_target, running, via
from tests.support.proxy import TCPProxy
from tests.support.receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
HAS_EGRESS = importlib.util.find_spec("services.egress.service") is not None
NEEDS_EGRESS = pytest.mark.skipif(
    not HAS_EGRESS, reason="services/egress/service.py (the webhook egress) is not there yet"
)


# Helpers -------------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def get_json(port: int, path: str) -> tuple[int, Any]:
    status, text = await http_get(port, path)
    return status, json.loads(text)


# Each poll is an HTTP request or a database read: every 0.2 s is often enough.
eventually = functools.partial(support.eventually, interval=0.2)


def spawn(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m mesh.cli ARGS`` in the background, stdout and stderr into ``log``."""
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", *args],
            env=env,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


async def finish(proc: subprocess.Popen[bytes], sig: int, timeout: float = 30) -> int:
    """Signal ``proc`` and wait for it off the event loop (it may need our receivers)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return await asyncio.to_thread(proc.wait)


async def run_cli(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def srv_ping(c: MeshClient, wait: float = 1.0) -> set[str]:
    """Names of the micro services answering ``$SRV.PING`` within ``wait`` seconds."""
    inbox = c.nc.new_inbox()
    names: set[str] = set()

    async def collect(msg: Any) -> None:
        names.add(json.loads(msg.data)["name"])

    sub = await c.nc.subscribe(inbox, cb=collect)
    try:
        await c.nc.publish("$SRV.PING", b"", reply=inbox)
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return names


def target_row(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((t for t in status["targets"] if t["name"] == name), None)


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def hsettings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "heartbeat_interval_s": 1.0,
            "db_url": f"sqlite:///{tmp_path / 'db' / 'mesh.db'}",
        }
    )


@pytest.fixture
async def health(hsettings: Settings) -> AsyncIterator[Health]:
    await migrate(hsettings.db_url)
    h = Health(hsettings, host="127.0.0.1")
    async with running(h):
        yield h


# Basics ---------------------------------------------------------------------------


async def test_healthz_readyz_and_status(health: Health, client: MeshClient) -> None:
    status, doc = await get_json(health.port, "/healthz")
    assert status == 200 and doc["ok"] is True and doc["instance"] == health.instance

    status, doc = await get_json(health.port, "/readyz")
    assert status == 200, doc
    assert doc["ready"] is True and doc["reason"] is None
    assert {k: v["ok"] for k, v in doc["checks"].items()} == {
        "nats": True,
        "jetstream": True,
        "database": True,
    }

    async def sees_itself() -> Any:
        _, st = await get_json(health.port, "/status")
        return st if any(s["instance"] == health.instance for s in st["services"]) else None

    st = await eventually(sees_itself, 10, "the health service's own heartbeat in /status")
    me = next(s for s in st["services"] if s["instance"] == health.instance)
    assert me["service"] == "health" and me["state"] == "up" and me["stale"] is False
    assert me["stats"]["pid"] == os.getpid()
    assert st["database"]["ok"] is True and st["database"]["backend"] == "sqlite"
    assert st["keys"]["ok"] is True and st["keys"]["warning"] is None
    assert st["keys"]["age_days"] < 1 and st["keys"]["rotation_days"] == 90
    assert "secret" not in json.dumps(st["keys"])
    assert st["broker"]["connected"] is True and st["ready"]["ok"] is True


async def test_a_taken_port_is_one_clear_error(hsettings: Settings, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = hsettings.model_copy(update={"http_port": port})
        h = Health(s, host="127.0.0.1")
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*MESH_HTTP_PORT"):
            await h.start()
        # Nothing half-started is left behind: no connection, no task.
        assert h.client.nc.is_closed and not h._tasks

        env = {**env_for(s), "MESH_HTTP_PORT": str(port), "MESH_HTTP_HOST": "127.0.0.1"}
        code, _, err = await run_cli(env, tmp_path, "serve", "health")
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("{")]
    assert lines == [lines[0]] and lines[0].startswith("mesh: error: cannot listen on")
    assert "Traceback" not in err


async def test_status_warns_about_an_old_primary_key(hsettings: Settings) -> None:
    ring = KeyRing.load(hsettings.key_path)
    fresh = Health(hsettings).key_status()
    assert fresh["primary_id"] == ring.primary.id and fresh["warning"] is None
    strict = Health(hsettings.model_copy(update={"key_rotation_days": 0})).key_status()
    assert strict["warning"] and "mesh keys rotate" in strict["warning"]
    missing = Health(hsettings.model_copy(update={"key_file": hsettings.home / "nope.key"}))
    doc = missing.key_status()
    assert doc["ok"] is False and "does not exist" in doc["error"]


async def test_every_service_answers_srv_ping(health: Health) -> None:
    nc = health.client.nc
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        answers.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish("$SRV.PING", b"", reply=inbox)
        await eventually(
            lambda: _found(answers, health.instance), 5, "a $SRV.PING answer from health"
        )
    finally:
        await sub.unsubscribe()
    mine = next(a for a in answers if a["metadata"].get("instance") == health.instance)
    assert mine["name"] == "mesh-health" and mine["metadata"]["service"] == "health"

    info = await nc.request(f"$SRV.INFO.mesh-health.{mine['id']}", b"", timeout=5)
    endpoints = json.loads(info.data)["endpoints"]
    assert [e["subject"] for e in endpoints] == [f"mesh.sys.status.health.{health.instance}"]
    reply = await nc.request(endpoints[0]["subject"], b"", timeout=5)
    beat = json.loads(reply.data)
    assert beat["service"] == "health" and beat["instance"] == health.instance


async def _found(answers: list[dict[str, Any]], instance: str) -> bool:
    return any(a.get("metadata", {}).get("instance") == instance for a in answers)


# Readiness follows its dependencies ------------------------------------------------


@pytest.mark.slow
async def test_readyz_turns_503_while_the_broker_is_down(
    health: Health, broker: EmbeddedBroker
) -> None:
    status, _ = await get_json(health.port, "/readyz")
    assert status == 200
    await broker.astop()
    try:

        async def down() -> Any:
            code, doc = await get_json(health.port, "/readyz")
            return doc if code == 503 else None

        doc = await eventually(down, 15, "/readyz 503 with the broker stopped")
        assert doc["ready"] is False
        assert doc["checks"]["nats"]["ok"] is False and "nats" in doc["reason"].lower()
        assert doc["checks"]["jetstream"]["ok"] is False
        # Liveness is not readiness: the process is fine.
        assert (await get_json(health.port, "/healthz"))[0] == 200
        _, st = await get_json(health.port, "/status")
        assert st["broker"]["connected"] is False and st["ready"]["ok"] is False
    finally:
        await broker.astart()  # same port, same store directory

    async def up() -> Any:
        code, doc = await get_json(health.port, "/readyz")
        return doc if code == 200 else None

    doc = await eventually(up, 30, "/readyz 200 after the broker came back")
    assert doc["checks"]["jetstream"]["ok"] is True


@pytest.mark.slow
async def test_readyz_turns_503_while_the_sqlite_database_is_gone(
    health: Health, hsettings: Settings
) -> None:
    db_dir = Path(hsettings.db_url.removeprefix("sqlite:///")).parent
    assert (await get_json(health.port, "/readyz"))[0] == 200
    away = db_dir.with_name("db-away")
    db_dir.rename(away)
    try:
        code, doc = await get_json(health.port, "/readyz")
        assert code == 503
        assert doc["checks"]["database"]["ok"] is False
        assert "does not exist" in doc["checks"]["database"]["error"]
        assert doc["reason"].startswith("database:")
        assert doc["checks"]["nats"]["ok"] is True
        # The check did not quietly create a fresh, empty database in its place.
        assert not db_dir.exists()

        async def status_says_down() -> bool:
            _, st = await get_json(health.port, "/status")
            return st["database"]["ok"] is False

        await eventually(status_says_down, 10, "/status database down")
    finally:
        away.rename(db_dir)

    async def up() -> bool:
        return (await get_json(health.port, "/readyz"))[0] == 200

    await eventually(up, 10, "/readyz 200 with the database back")


@pytest.mark.slow
@pytest.mark.postgres
async def test_readyz_turns_503_while_postgres_is_unreachable(
    hsettings: Settings, pg_dsn: str
) -> None:
    host, port = pg_target(pg_dsn)
    async with pg_schema(pg_dsn) as url, TCPProxy(host, port) as proxy:
        await migrate(url)
        s = hsettings.model_copy(update={"db_url": via(url, "127.0.0.1", proxy.port)})
        h = Health(s, host="127.0.0.1")
        async with running(h):
            code, doc = await get_json(h.port, "/readyz")
            assert code == 200, doc
            assert doc["checks"]["database"]["backend"] == "postgres"
            proxy.trigger_connectivity_loss()

            async def down() -> Any:
                code, doc = await get_json(h.port, "/readyz")
                return doc if code == 503 else None

            doc = await eventually(down, 15, "/readyz 503 with PostgreSQL cut off")
            assert doc["checks"]["database"]["ok"] is False
            assert doc["checks"]["nats"]["ok"] is True
            proxy.restore_connectivity()

            async def up() -> bool:
                return (await get_json(h.port, "/readyz"))[0] == 200

            await eventually(up, 15, "/readyz 200 with PostgreSQL reachable again")


# Metrics -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_metrics_parse_and_carry_the_mesh_families_after_traffic(
    hsettings: Settings, client: MeshClient
) -> None:
    from services.sink.service import Sink

    await migrate(hsettings.db_url)
    await client.add_target(Target(name="m-queue", kind=TargetKind.NATS))
    await client.add_propagation("unidirectional", "m-shop", ["m-queue"])
    services: list[Service] = [Sink(hsettings), Health(hsettings, host="127.0.0.1")]
    async with Receiver() as rx:
        if HAS_EGRESS:
            from services.egress.service import WebhookEgress

            rx.fail_first(1, status=503)
            await client.add_target(
                Target(
                    name="m-hook",
                    kind=TargetKind.WEBHOOK,
                    url=rx.url,
                    retry=RetryPolicy(base_s=0.05, max_delay_s=0.2),
                )
            )
            await client.add_propagation("unidirectional", "m-shop", ["m-hook"])
            services.append(WebhookEgress(hsettings))
        health = services[1]
        assert isinstance(health, Health)
        async with running(*services):
            for i in range(4):
                await client.publish("m-shop", "order.created", {"n": i})
            dlq_headers = {"mesh-dlq-target": "m-queue", "Nats-Msg-Id": "dlq-metrics-test"}
            await client.js.publish("mesh.dlq.m-queue", b"x", headers=dlq_headers)
            if HAS_EGRESS:
                await rx.wait_for(4, unique=True, timeout=30)

            async def scraped() -> Any:
                code, text = await http_get(health.port, "/metrics")
                assert code == 200
                s = metric_samples(text)
                pending = sample(s, "mesh_consumer_pending", target="m-queue")
                rows = sample(s, "mesh_sink_rows_written_total", table="events")
                ok = pending == 4 and rows is not None and rows >= 4
                if HAS_EGRESS:
                    ok = ok and (
                        sample(s, "mesh_deliveries_total", target="m-hook", outcome="delivered")
                        == 4
                    )
                return s if ok else None

            s = await eventually(scraped, 30, "mesh_ metrics after traffic")
    names = {name for name, _ in s}
    for family in (
        "mesh_client_events_published_total",
        "mesh_consumer_pending",
        "mesh_dlq_depth",
        "mesh_sink_rows_written_total",
        "mesh_service_up",
        "mesh_bridge_connections",
    ):
        assert family in names, family
    assert (sample(s, "mesh_client_events_published_total", source="m-shop") or 0) >= 4
    assert sample(s, "mesh_dlq_depth", target="m-queue") == 1
    assert sample(s, "mesh_service_up", service="health") == 1
    assert sample(s, "mesh_service_up", service="sink") == 1
    if HAS_EGRESS:
        attempts = sample(s, "mesh_delivery_attempts_total", target="m-hook")
        assert attempts is not None and attempts >= 5  # four events, one retried
        count = sample(s, "mesh_delivery_latency_seconds_count", target="m-hook")
        assert count is not None and count >= 4
        assert (sample(s, "mesh_delivery_latency_seconds_sum", target="m-hook") or 0) > 0
        assert sample(s, "mesh_circuit_state", target="m-hook") == 0


# Status -----------------------------------------------------------------------------


async def test_status_success_rate_and_failures_from_delivery_records(
    health: Health, client: MeshClient
) -> None:
    await client.add_target(Target(name="r-queue", kind=TargetKind.NATS))
    # Garbage on the record and heartbeat subjects is ignored, not fatal.
    bad = b'{"event_id": "x", "target": "r-queue", "attempt": "two", "outcome": "retry"}'
    for junk in (b"not json", bad):
        await client.nc.publish("mesh.sys.delivery.r-queue", junk)
        await client.nc.publish("mesh.sys.health.x.y", junk)
    for i in range(3):
        await client.deliveries.record(DeliveryRecord(f"ok-{i}", "r-queue", 1, Outcome.DELIVERED))
    await client.deliveries.record(
        DeliveryRecord("bad-1", "r-queue", 2, Outcome.RETRY, status_code=502, error="HTTP 502")
    )
    why = "filter of propagation p1 (data.n > 1) is false"
    await client.deliveries.record(
        DeliveryRecord("skip-1", "r-queue", 0, Outcome.SKIPPED, error=why)
    )

    async def counted() -> Any:
        _, st = await get_json(health.port, "/status")
        row = target_row(st, "r-queue")
        return st if row and row["attempts"] == 4 else None

    st = await eventually(counted, 10, "four attempts counted for r-queue")
    row = target_row(st, "r-queue")
    assert row is not None
    assert row["success_rate"] == 0.75 and row["delivered"] == 3 and row["failed"] == 1
    assert row["kind"] == "nats" and row["circuit"] is None
    (failure,) = [f for f in st["recent_failures"] if f["target"] == "r-queue"]
    assert failure["event_id"] == "bad-1" and failure["attempt"] == 2
    assert failure["status_code"] == 502 and failure["error"] == "HTTP 502"
    skips = await eventually(
        lambda: _skips(health.port), 10, "the skipped record in /status recent_skips"
    )
    assert [(s["event_id"], s["reason"]) for s in skips] == [("skip-1", why)]


async def _skips(port: int) -> list[Any] | None:
    _, st = await get_json(port, "/status")
    return [s for s in st["recent_skips"] if s["target"] == "r-queue"] or None


@pytest.mark.slow
@NEEDS_EGRESS
async def test_status_shows_lag_growing_and_the_circuit_open_for_a_down_receiver(
    hsettings: Settings, client: MeshClient
) -> None:
    from services.egress.service import WebhookEgress

    await migrate(hsettings.db_url)
    dead_port = free_port()  # nothing listens here: every attempt is refused
    await client.add_target(
        Target(
            name="down",
            kind=TargetKind.WEBHOOK,
            url=f"http://127.0.0.1:{dead_port}/hook",
            timeout_s=1,
            retry=RetryPolicy(base_s=0.05, max_delay_s=0.2, max_retries=100),
            circuit_threshold=2,
            circuit_open_s=60,
        )
    )
    await client.add_propagation("unidirectional", "d-shop", ["down"])
    health = Health(hsettings, host="127.0.0.1")
    async with running(WebhookEgress(hsettings), health):
        for i in range(3):
            await client.publish("d-shop", "order.created", {"n": i})

        async def circuit_open() -> Any:
            _, st = await get_json(health.port, "/status")
            row = target_row(st, "down")
            return st if row and row["circuit"] == "open" and row["lag"] == 3 else None

        st = await eventually(circuit_open, 30, "the circuit of 'down' open in /status")
        first = target_row(st, "down")
        assert first is not None
        assert first["success_rate"] == 0.0 and first["failed"] >= 2
        failures = [f for f in st["recent_failures"] if f["target"] == "down"]
        assert failures and all(f["event_id"] for f in failures)
        assert st["totals"]["open_circuits"] >= 1

        for i in range(4):
            await client.publish("d-shop", "order.created", {"n": 10 + i})

        async def grown() -> Any:
            _, st = await get_json(health.port, "/status")
            row = target_row(st, "down")
            return row if row and row["lag"] == 7 else None

        row = await eventually(grown, 15, "lag of 'down' growing to 7")
        assert row["circuit"] == "open" and row["delivered"] == 0
        _, text = await http_get(health.port, "/metrics")
        s = metric_samples(text)
        assert sample(s, "mesh_consumer_pending", target="down") == 7
        assert sample(s, "mesh_circuit_state", target="down") == 2


@pytest.mark.slow
async def test_a_killed_service_turns_stale_within_15_s(
    health: Health, hsettings: Settings, tmp_path: Path
) -> None:
    env = env_for(hsettings)
    env.update(
        {
            "MESH_HTTP_PORT": str(free_port()),
            "MESH_HEARTBEAT_INTERVAL_S": "1",
            "MESH_DB_URL": hsettings.db_url,
        }
    )
    proc = spawn(["serve", "health"], env, tmp_path, tmp_path / "victim.log")
    try:

        async def victim() -> Any:
            _, st = await get_json(health.port, "/status")
            return next((s for s in st["services"] if s["stats"].get("pid") == proc.pid), None)

        row = await eventually(victim, 60, "the second health instance's heartbeat")
        assert row["state"] == "up" and row["interval_s"] == 1.0
        await finish(proc, signal.SIGKILL)
        killed_at = time.monotonic()

        async def stale() -> Any:
            found = await victim()
            return found if found and found["state"] == "stale" else None

        row = await eventually(stale, 15, "the killed instance marked stale")
        assert time.monotonic() - killed_at < 15
        assert row["age_s"] > 3 * row["interval_s"]
        _, st = await get_json(health.port, "/status")
        assert st["totals"]["stale_services"] >= 1
        me = next(s for s in st["services"] if s["instance"] == health.instance)
        assert me["state"] == "up"
    finally:
        await finish(proc, signal.SIGKILL)


# Logs never carry secrets or payloads ------------------------------------------------


@pytest.mark.slow
async def test_no_secret_or_payload_in_any_log_line(settings: Settings, tmp_path: Path) -> None:
    marker = "PAYLOAD-CANARY-5d1e9"
    secret = "whsec_" + "c2VjcmV0LWNhbmFyeS1mb3ItbG9ncy0xMjM0NTY3OA=="
    env = env_for(settings)
    env.update({"MESH_LOG_LEVEL": "debug", "MESH_HEARTBEAT_INTERVAL_S": "1"})
    logs: list[Path] = []

    async def cli(*args: str) -> str:
        code, out, err = await run_cli(env, tmp_path, *args)
        path = tmp_path / f"cli-{len(logs)}.log"
        path.write_text(err)
        logs.append(path)
        assert code == 0, err
        return out

    async with Receiver() as rx:
        rx.fail_first(2, status=500)
        await cli("init")
        await cli(
            "target", "add", "hook", "--webhook", rx.url, "--secret", secret, "--retry-base", "0.05"
        )
        await cli("propagate", "unidirectional", "--source", "shop", "--target", "hook")
        up_log = tmp_path / "up.log"
        logs.append(up_log)
        proc = spawn(["up"], env, tmp_path, up_log)
        try:

            async def ready() -> bool:
                try:
                    return (await http_get(settings.http_port, "/readyz"))[0] == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, 60, "mesh up ready")
            data = json.dumps({"card": marker, "note": f"{marker} again"})
            await cli("publish", "--source", "shop", "--type", "order.created", "--data", data)
            await cli(
                "publish", "--source", "shop", "--type", "order.paid", "--data", data, "--json-body"
            )
            if HAS_EGRESS:
                await rx.wait_for(2, unique=True, timeout=30)
                assert marker in rx.requests[-1].body.decode()  # it was really delivered

            async def recorded() -> Any:
                _, st = await get_json(settings.http_port, "/status")
                row = target_row(st, "hook")
                return st if row and (not HAS_EGRESS or row["delivered"] >= 2) else None

            st = await eventually(recorded, 30, "the deliveries in /status")
            assert marker not in json.dumps(st) and secret not in json.dumps(st)
            _, page = await http_get(settings.http_port, "/")
            _, metrics = await http_get(settings.http_port, "/metrics")
            assert marker not in page + metrics and secret not in page + metrics
            # Every service of `mesh up` answers $SRV.PING.
            from services.runner import available_services

            async with MeshClient(settings, name="ping") as c:
                found = await srv_ping(c)
            assert {f"mesh-{name}" for name in available_services()} <= found
        finally:
            code = await finish(proc, signal.SIGTERM)
    assert code == 0, up_log.read_text()[-3000:]
    ring = KeyRing.load(settings.key_path, create=False)
    forbidden = [marker, secret, secret.removeprefix("whsec_"), *(k.secret for k in ring.keys)]
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    # The run logged for real (debug level, several services), as JSON lines.
    json_lines = [line for line in up_log.read_text().splitlines() if line.startswith("{")]
    assert len(json_lines) > 5
    assert any('"service": "health"' in line for line in json_lines)
    for needle in forbidden:
        assert needle not in text, f"{needle[:12]}... leaked into a log line"
