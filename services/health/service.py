"""Health, readiness, status, metrics and the dashboard, over HTTP on ``MESH_HTTP_PORT``.

::

    GET /         the dashboard (one page, no external assets, polls /status)
    GET /healthz  200 while this process runs
    GET /readyz   200 while NATS, JetStream and the database answer; 503 + JSON reason
    GET /status   JSON: services (heartbeats), targets (lag, circuit, DLQ, success
                  rate, throughput), recent failures, database, key age
    GET /metrics  Prometheus text format

What it knows comes from three places: heartbeats on ``<prefix>.sys.health.>``
(services, their age and their circuit breakers), delivery-attempt records on
``<prefix>.sys.delivery.>`` (a sliding window of outcomes), and JetStream itself
(consumer and DLQ depths, read once a second by a background loop that also
refreshes the ``mesh_consumer_pending`` and ``mesh_dlq_depth`` gauges).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiohttp import web
from prometheus_client import REGISTRY

from mesh._nats.types import Msg, Subscription
from mesh.config import Settings
from mesh.durability import broker_sync
from mesh.errors import ConfigError, DecodeError, MeshError
from mesh.observability import (
    CIRCUIT_VALUES,
    METRICS,
    DeliveryWindow,
    HeartbeatInfo,
    ServiceTracker,
    worst_circuit,
)
from mesh.records import read_records
from mesh.storage import Store, backend_of, open_store
from services.base import Service
from services.health.http import HealthRoutes, dumps
from services.health.keycheck import key_doc, short_error

REFRESH_S = 1.0  # JetStream figures: consumer and DLQ depth, ingress rate
CHECK_TIMEOUT_S = 2.0  # one readiness probe (NATS round trip, database ping)
SYNC_CHECK_S = 60.0  # the broker's sync mode (mesh/durability.py) is read this often
DB_CHECK_S = 2.0  # /status shows a database check at most this old
KEY_CHECK_S = 10.0  # re-read the key file at most this often
RATE_HISTORY_S = 10.0  # ingress rate over this many seconds
DELIVERY_WINDOW_S = 300.0  # success rate over the last five minutes
MAX_FAILURES_SHOWN = 20
LAG_HISTORY = 60  # samples of each target's lag kept for the dashboard's sparkline
SUB_PENDING_MSGS = 65_536  # records arriving faster than this are dropped, not queued forever


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


class Health(Service):
    """The health/status HTTP service (``mesh serve health``)."""

    name: ClassVar[str] = "health"

    def __init__(
        self, settings: Settings, *, instance: str | None = None, host: str | None = None
    ) -> None:
        super().__init__(settings, instance=instance)
        # All interfaces by default (a container publishes the port); MESH_HTTP_HOST narrows it.
        self.host = host or settings.http_host
        self.port = settings.http_port
        self.tracker = ServiceTracker(settings.heartbeat_interval_s)
        self.window = DeliveryWindow(DELIVERY_WINDOW_S)
        self.snapshot: dict[str, Any] = {"at": None, "targets": [], "error": "not refreshed yet"}
        self.database: dict[str, Any] = {"ok": None, "error": "not checked yet"}
        self._store: Store | None = None
        self._store_lock = asyncio.Lock()
        self._subs: list[Subscription] = []
        self._runner: web.AppRunner | None = None
        self._ingress: list[tuple[float, int]] = []
        self._broker_url: str | None = None
        self._sync: tuple[float, dict[str, Any]] | None = None
        self._keys: tuple[float, dict[str, Any]] | None = None
        self._metric_targets: set[str] = set()
        self._lag_history: dict[str, deque[int]] = {}
        self._metric_services: set[tuple[str, str]] = set()
        self.records_seen = 0
        self.heartbeats_seen = 0

    # Service hooks ------------------------------------------------------------------

    async def on_start(self) -> None:
        port = self.client.port
        subjects = self.client.subjects
        self._subs.append(
            await port.subscribe(
                subjects.health_all, cb=self._on_heartbeat, pending_msgs_limit=SUB_PENDING_MSGS
            )
        )
        self._subs.append(
            await port.subscribe(
                subjects.delivery_all, cb=self._on_record, pending_msgs_limit=SUB_PENDING_MSGS
            )
        )
        # The HTTP API's GET /v1/status asks here (one health instance answers): the
        # same document as /status, from the one builder.
        self._subs.append(
            await port.subscribe(subjects.status_doc, queue="health", cb=self._on_status_request)
        )
        await self._refresh_once()
        await self.check_database()
        self.spawn(self._refresh_loop(), name="health-refresh")
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port} for the health service"
                f" ({exc.strerror or exc}): set MESH_HTTP_PORT to a free port"
            ) from None
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        self.log.info("health http listening", host=self.host, port=self.port)

    async def on_drain(self, timeout: float) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def on_close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._close_store()

    def stats(self) -> dict[str, Any]:
        return {
            "http_port": self.port,
            "services_seen": len(self.tracker.view()),
            "records_seen": self.records_seen,
            "heartbeats_seen": self.heartbeats_seen,
        }

    # Inputs ----------------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            info = HeartbeatInfo.parse(msg.data)
        except (ValueError, TypeError):
            return
        self.heartbeats_seen += 1
        self.tracker.observe(info)

    async def _on_record(self, msg: Msg) -> None:
        try:
            recs = read_records(msg.data)  # a batch of attempts, or one (older egresses)
        except DecodeError:
            return
        for rec in recs:
            try:
                status_code = int(rec.status_code) if rec.status_code is not None else None
                attempt = int(rec.attempt or 0)
            except (ValueError, TypeError):
                continue
            self.records_seen += 1
            self.window.observe(
                str(rec.target),
                str(rec.outcome),
                event_id=str(rec.event_id),
                attempt=attempt,
                status_code=status_code,
                error=str(rec.error) if rec.error is not None else None,
                at=str(rec.at) if rec.at else None,
            )

    async def _on_status_request(self, msg: Msg) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(dumps(self.status()).encode())

    # JetStream figures ----------------------------------------------------------------

    async def _refresh_once(self) -> None:
        before = self.snapshot.get("error")
        try:
            await self.refresh()
        except Exception as exc:  # the loop must outlive any one bad refresh
            self.snapshot = {**self.snapshot, "error": short_error(exc) or type(exc).__name__}
        after = self.snapshot.get("error")
        # Say it when it changes, not once a second for as long as it lasts.
        if after != before and after is not None:
            self.log.warning("status refresh failed", error=after)
        elif after is None and before not in (None, "not refreshed yet"):
            self.log.info("status refresh recovered")

    async def _refresh_loop(self) -> None:
        last_db = time.monotonic()
        while not self.stopping.is_set():
            await asyncio.sleep(REFRESH_S)
            await self._refresh_once()
            if time.monotonic() - last_db >= DB_CHECK_S:
                last_db = time.monotonic()
                await self.check_database()

    async def refresh(self) -> None:
        """Read targets, consumer and DLQ depths from JetStream; update the gauges."""
        self._update_service_metrics()
        port = self.client.port
        if not port.is_connected:
            # Keep the last figures (marked by the error), but no rate: nothing is measured.
            self.snapshot = {
                **self.snapshot,
                "events_per_s": None,
                "error": "NATS is not connected",
            }
            self._ingress.clear()
            return
        url = port.server_url
        if url is not None:
            self._broker_url = f"{url.scheme}://{url.hostname}:{url.port}"
        if self._sync is None or time.monotonic() - self._sync[0] > SYNC_CHECK_S:
            sync = await broker_sync(port, self.settings.nats_store_dir)
            self._sync = (time.monotonic(), sync)
        names = self.client.names
        targets = await asyncio.wait_for(self.client.registry.list_targets(), CHECK_TIMEOUT_S)

        infos = await asyncio.gather(
            *(asyncio.wait_for(self.deliveries.queue_depth(t), CHECK_TIMEOUT_S) for t in targets),
            return_exceptions=True,
        )
        dlq: dict[str, int] = {}
        with contextlib.suppress(Exception):
            dlq = await asyncio.wait_for(self.deliveries.dlq_depths(), CHECK_TIMEOUT_S)
        events_total: int | None = None
        with contextlib.suppress(Exception):
            einfo = await asyncio.wait_for(port.stream_info(names.events), CHECK_TIMEOUT_S)
            events_total = int(einfo.state.last_seq)
        rows = []
        for t, info in zip(targets, infos, strict=True):
            row: dict[str, Any] = {
                "name": t.ref,
                "kind": str(t.kind),
                "status": str(t.status),
                "dlq": dlq.get(t.ref, 0),
            }
            if isinstance(info, BaseException):
                row.update(lag=None, pending=None, unacked=None, paused=False)
                row["error"] = short_error(info)
            else:
                row.update(info)
                METRICS.consumer_pending.labels(t.ref).set(info["lag"])
                hist = self._lag_history.setdefault(t.ref, deque(maxlen=LAG_HISTORY))
                hist.append(info["lag"])
            METRICS.dlq_depth.labels(t.ref).set(row["dlq"])
            rows.append(row)
        current = {t.ref for t in targets}
        for gone in set(self._lag_history) - current:
            del self._lag_history[gone]
        for gone in self._metric_targets - current:
            for gauge in (METRICS.consumer_pending, METRICS.dlq_depth):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._metric_targets = current
        self._update_circuit_metrics(rows)
        self.snapshot = {
            "at": _now_iso(),
            "targets": rows,
            "events_total": events_total,
            "events_per_s": self._ingress_rate(events_total),
            "error": None,
        }

    def _ingress_rate(self, total: int | None) -> float | None:
        if total is None:
            return None
        now = time.monotonic()
        self._ingress.append((now, total))
        self._ingress = [(t, n) for t, n in self._ingress if now - t <= RATE_HISTORY_S]
        t0, n0 = self._ingress[0]
        if now - t0 < 0.5:
            return None
        return round(max(0, total - n0) / (now - t0), 3)

    def _update_service_metrics(self) -> None:
        counts = self.tracker.counts()
        for key in self._metric_services - set(counts):
            with contextlib.suppress(KeyError):
                METRICS.service_instances.remove(*key)
        for (service, state), n in counts.items():
            METRICS.service_instances.labels(service, state).set(n)
        self._metric_services = set(counts)

    def _update_circuit_metrics(self, rows: list[dict[str, Any]]) -> None:
        # In one process with the egress (mesh up), the egress sets the gauge itself
        # and is fresher than its heartbeats; elsewhere the heartbeats are all we have.
        if REGISTRY.get_sample_value("mesh_service_up", {"service": "webhook-egress"}) == 1:
            return
        for row in rows:
            state = self._circuit(row)
            if state in CIRCUIT_VALUES:
                METRICS.circuit_state.labels(row["name"]).set(CIRCUIT_VALUES[state])

    def _circuit(
        self, row: dict[str, Any], circuits: dict[str, dict[str, str]] | None = None
    ) -> Any:
        circuits = self.tracker.circuits() if circuits is None else circuits
        states = list(circuits.get(row["name"], {}).values())
        if row.get("paused"):
            states.append("open")  # the egress pauses the consumer of an open circuit
        return worst_circuit(states)

    # Readiness ---------------------------------------------------------------------

    async def check_nats(self) -> tuple[dict[str, Any], dict[str, Any]]:
        port = self.client.port
        if not port.is_connected:
            down = {"ok": False, "error": "NATS is not connected (reconnecting)"}
            return down, {"ok": False, "error": "NATS is not connected"}
        nats = {"ok": True, "error": None}
        try:
            await asyncio.wait_for(port.account_info(), CHECK_TIMEOUT_S)
        except TimeoutError:
            return nats, {"ok": False, "error": f"JetStream did not answer in {CHECK_TIMEOUT_S}s"}
        except Exception as exc:
            return nats, {"ok": False, "error": f"JetStream: {short_error(exc)}"}
        return nats, {"ok": True, "error": None}

    async def check_database(self) -> dict[str, Any]:
        """Check the database (``Store.check``: a SQLite file must exist, writable)."""
        url = self.settings.db_url
        result: dict[str, Any] = {"ok": False, "error": None, "backend": None, "checked_at": None}
        try:
            result["backend"] = backend_of(url)
            async with self._store_lock:
                if self._store is None:
                    opening = open_store(url, existing=True)  # the health service creates none
                    self._store = await asyncio.wait_for(opening, CHECK_TIMEOUT_S * 2)
                await asyncio.wait_for(self._store.check(), CHECK_TIMEOUT_S)
            result.update(ok=True)
        except TimeoutError:
            result["error"] = f"the database did not answer in {CHECK_TIMEOUT_S}s"
            await self._close_store()
        except (MeshError, OSError) as exc:
            result["error"] = short_error(exc)
            await self._close_store()
        result["checked_at"] = _now_iso()
        self.database = result
        return result

    async def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.close(), CHECK_TIMEOUT_S)

    async def readiness(self) -> dict[str, Any]:
        (nats, jetstream), database = await asyncio.gather(self.check_nats(), self.check_database())
        checks = {"nats": nats, "jetstream": jetstream, "database": database}
        failing = [f"{name}: {c['error']}" for name, c in checks.items() if not c["ok"]]
        return {
            "ready": not failing,
            "reason": "; ".join(failing) or None,
            "checks": checks,
        }

    # Status ------------------------------------------------------------------------------

    def key_status(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._keys is not None and now - self._keys[0] < KEY_CHECK_S:
            return self._keys[1]
        doc = key_doc(self.settings.key_path, self.settings.key_rotation_days)
        self._keys = (now, doc)
        return doc

    def status(self) -> dict[str, Any]:
        services = self.tracker.view()
        circuits = self.tracker.circuits()
        targets = []
        for row in self.snapshot.get("targets", []):
            name = row["name"]
            summary = self.window.summary(name)
            targets.append(
                {
                    **row,
                    "circuit": self._circuit(row, circuits),
                    "circuit_by_instance": circuits.get(name, {}),
                    "lag_history": list(self._lag_history.get(name, ())),
                    "delivered_per_s": summary["delivered_per_s"],
                    "success_rate": summary["success_rate"],
                    "delivered": summary["delivered"],
                    "failed": summary["failed"],
                    "attempts": summary["attempts"],
                    "last_delivered_at": summary["last_delivered_at"],
                    "last_failed_at": summary["last_failed_at"],
                }
            )
        port = self.client.port
        total_lag = sum(t["lag"] or 0 for t in targets)
        js_ok = port.is_connected and self.snapshot.get("error") is None
        ready = {
            "nats": port.is_connected,
            "jetstream": js_ok,
            "database": bool(self.database.get("ok")),
        }
        return {
            "generated_at": _now_iso(),
            "instance": self.instance,
            "prefix": self.settings.prefix,
            "broker": {
                "connected": port.is_connected,
                "url": self._broker_url,
                "server_version": _version(port) if port.is_connected else None,
                "reconnects": self.client.reconnects,
                "sync": self._sync[1] if self._sync else None,
            },
            "ready": {"ok": all(ready.values()), **ready},
            "refreshed_at": self.snapshot.get("at"),
            "refresh_error": self.snapshot.get("error"),
            "events_per_s": self.snapshot.get("events_per_s"),
            "events_total": self.snapshot.get("events_total"),
            "heartbeat_interval_s": self.settings.heartbeat_interval_s,
            "services": services,
            "targets": targets,
            "totals": {
                "lag": total_lag,
                "dlq": sum(t["dlq"] or 0 for t in targets),
                "open_circuits": sum(1 for t in targets if t["circuit"] == "open"),
                "stale_services": sum(1 for s in services if s["stale"]),
            },
            "deliveries": self.window.summary(),
            "recent_failures": self.window.recent_failures(MAX_FAILURES_SHOWN),
            "recent_skips": self.window.recent_skips(MAX_FAILURES_SHOWN),
            "database": self.database,
            "keys": self.key_status(),
        }

    # HTTP -------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        return HealthRoutes(
            service=self.name,
            instance=self.instance,
            status=self.status,
            readiness=self.readiness,
            before_metrics=self._update_service_metrics,
        ).make_app()


def _version(port: Any) -> str | None:
    try:
        v = port.server_version
        return f"{v.major}.{v.minor}.{v.patch}"
    except Exception:
        return None


__all__ = ["Health"]
