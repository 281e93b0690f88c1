"""Tenants in the sink's history: rows carry their tenant, every query carries it, and a
tenant's key reads only its own over REST and GraphQL. Real nats-server, webhook egress,
sink, API and receivers, on SQLite and PostgreSQL; then per-tenant retention."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from mesh.apikeys import ApiKeyStore, Scope
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.storage import DeadLetterRow, DeliveryRow, EventRow, Store, TenantView, open_store
from mesh.tenants import Quotas, TenantStore
from services.api import Api
from services.egress import WebhookEgress
from services.sink import Sink
from services.sink.retention import Retention, stored_days_reader
from tests.support import eventually
from tests.support.api import Http, api_running, make_key
from tests.support.receiver import Receiver, Reply, fast_policy


@pytest.fixture
async def mesh(settings: Settings, client: MeshClient, db_url: str) -> AsyncIterator[Api]:
    """The API, a sink and a webhook egress on one database of each backend."""
    s = settings.model_copy(update={"db_url": db_url})
    sink = Sink(s, batch_size=100, fetch_wait=0.2)
    egress = WebhookEgress(s, fetch_expires_s=0.5)
    await sink.start()
    await egress.start()
    try:
        async with api_running(s) as api:
            yield api
    finally:
        await egress.stop()
        await sink.stop()


async def _tenant_key(client: MeshClient, tenant: str) -> str:
    keys = await ApiKeyStore.open(client.port, client.names.apikeys)
    return (await keys.create(f"{tenant}-key", Scope.ADMIN, tenant=tenant))[1]


async def _hook(client: MeshClient, tenant: str, url: str, retries: int) -> None:
    await client.add_target(
        Target(
            name=f"{tenant}-hook",
            kind=TargetKind.WEBHOOK,
            url=url,
            tenant=tenant,
            retry=fast_policy(max_retries=retries),
            timeout_s=5.0,
            circuit_threshold=50,
        )
    )
    await client.registry.add_propagation(
        PropagationMode.UNIDIRECTIONAL, "shop", [f"{tenant}-hook"], tenant=tenant
    )


async def _graph(http: Http, query: str) -> dict[str, Any]:
    status, _, body = await http.call("POST", "/v1/graphql", {"query": query})
    assert status == 200 and not body.get("errors"), body
    data: dict[str, Any] = body["data"]
    return data


@pytest.mark.slow
async def test_a_tenant_reads_only_its_own_history(
    settings: Settings, client: MeshClient, mesh: Api, db_url: str
) -> None:
    tenants = await TenantStore.open(client.port, client.names.tenants)
    for t in ("ta", "tb"):
        await tenants.create(t)
    async with Receiver() as ok, Receiver(Reply(500, body=b"b is down")) as down:
        await _hook(client, "ta", ok.url, retries=3)
        await _hook(client, "tb", down.url, retries=1)  # an attempt to retry, then dead
        await client.provisioner.reconcile_all()
        ids: dict[str, str] = {}
        for t in ("ta", "tb"):
            async with MeshClient(settings.model_copy(update={"tenant": t}), name=t) as c:
                ids[t] = await c.publish("shop", "order.created", {"tenant": t})
        d_id = await client.publish("shop", "order.created", {"tenant": "default"})

        # The sink files every row under its tenant (read straight from the database).
        async with await open_store(db_url) as store:

            async def stored() -> bool:
                dead = await store.query_dead_letters("tb-hook")
                delivered = await store.query_deliveries(ids["ta"])
                b_tried = len(await store.query_deliveries(ids["tb"])) >= 2  # retry, dead
                events = [await store.get_event(i) for i in (*ids.values(), d_id)]
                return bool(dead and delivered and b_tried and None not in events)

            await eventually(stored, timeout=30, what="both tenants' rows in the sink")
            b_attempts = await store.query_deliveries(ids["tb"])
            assert {d.tenant for d in b_attempts} == {"tb"} and len(b_attempts) >= 2
            [letter] = await store.query_dead_letters("tb-hook")
            assert letter.tenant == "tb"
            assert [d.tenant for d in await store.query_deliveries(ids["ta"])] == ["ta"]
            # the query layer: a tenant's view never returns another's rows
            a_view = TenantView(store, "ta")
            assert await a_view.get_event(ids["tb"]) is None
            assert await a_view.query_deliveries(ids["tb"]) == []
            assert await a_view.query_dead_letters() == []
            assert [e.id for e in (await a_view.list_events()).items] == [ids["ta"]]
            assert await store.query_dead_letters(tenant="ta") == []
            assert len((await store.list_events()).items) == 3  # an operator: all

    a_key, b_key = await _tenant_key(client, "ta"), await _tenant_key(client, "tb")
    async with Http(mesh.url, a_key) as http:
        status, _, page = await http.call("GET", "/v1/events")
        assert status == 200 and [e["id"] for e in page["items"]] == [ids["ta"]], page
        status, _, page = await http.call("GET", "/v1/deliveries")
        assert status == 200 and {d["target"] for d in page["items"]} == {"ta-hook"}, page
        status, _, page = await http.call("GET", f"/v1/deliveries?event_id={ids['tb']}")
        assert status == 200 and page["items"] == [], page
        status, _, mine = await http.call("GET", f"/v1/events/{ids['ta']}")
        assert status == 200 and mine["deliveries"][0]["outcome"] == "delivered", mine
        # B's and the default tenant's: exactly what a missing one gets
        for other in (ids["tb"], d_id):
            status, _, body = await http.call("GET", f"/v1/events/{other}")
            ghost = await http.call("GET", "/v1/events/no-such-event")
            assert status == ghost[0] == 404, body
            assert body["detail"].replace(other, "no-such-event") == ghost[2]["detail"]
        for path in ("/v1/deliveries?target=tb-hook", f"/v1/dead-letters/{ids['tb']}"):
            assert (await http.call("GET", path))[0] == 404, path

        data = await _graph(
            http,
            "{ events { items { id source } } deliveries { items { target eventId } }"
            f' event(id: "{ids["tb"]}") {{ id }}'
            f' other: deliveries(eventId: "{ids["tb"]}") {{ items {{ id }} }} }}',
        )
        assert [e["id"] for e in data["events"]["items"]] == [ids["ta"]]
        assert {d["target"] for d in data["deliveries"]["items"]} == {"ta-hook"}
        assert data["event"] is None and data["other"]["items"] == []
        assert "tb" not in json.dumps(data).replace(ids["tb"], "")

    async with Http(mesh.url, b_key) as http:  # B sees its own: the 404s above are not empty
        status, _, page = await http.call("GET", "/v1/events")
        assert [e["id"] for e in page["items"]] == [ids["tb"]], page
        status, _, letters = await http.call("GET", f"/v1/dead-letters/{ids['tb']}")
        assert status == 200 and letters[0]["target"] == "tb-hook", letters
        data = await _graph(http, "{ deliveries { items { target outcome } } }")
        assert {d["outcome"] for d in data["deliveries"]["items"]} >= {"retry", "dead"}

    _, operator = await make_key(client, "read")
    async with Http(mesh.url, operator) as http:  # an operator key: every tenant's
        status, _, page = await http.call("GET", "/v1/events")
        assert {e["id"] for e in page["items"]} == {*ids.values(), d_id}


# Per-tenant retention ------------------------------------------------------------------

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def _log() -> Any:
    return structlog.wrap_logger(None, processors=[LogCapture()])


def _rows(tenant: str, age_days: int) -> tuple[EventRow, DeliveryRow, DeadLetterRow]:
    at = NOW - timedelta(days=age_days)
    key = f"{tenant}-{age_days}"
    return (
        EventRow(
            id=key,
            subject=f"mesh.evt.~{tenant}.shop.x",
            source=f"~{tenant}.shop",
            type="x",
            time=at,
            payload=b"p",
            received_at=at,
            tenant=tenant,
        ),
        DeliveryRow(
            id=f"d-{key}",
            event_id=key,
            target=f"{tenant}-hook",
            attempt=1,
            outcome="delivered",
            at=at,
            tenant=tenant,
        ),
        DeadLetterRow(
            id=f"l-{key}",
            event_id=key,
            target=f"{tenant}-hook",
            attempts=1,
            last_error="x",
            payload=b"p",
            encrypted=False,
            dead_at=at,
            tenant=tenant,
        ),
    )


async def test_stored_days_prunes_each_tenant_by_its_own_period(
    client: MeshClient, store: Store
) -> None:
    """``short`` keeps 3 days, ``long`` 100, everyone else the general 30: rows of 10 and
    40 days go or stay by their tenant's period (the quotas read from the real bucket)."""
    tenants = await TenantStore.open(client.port, client.names.tenants)
    await tenants.create("short", Quotas(stored_days=3))
    await tenants.create("long", Quotas(stored_days=100))
    await tenants.create("plain")
    rows = [_rows(t, age) for t in ("default", "short", "long", "plain") for age in (1, 10, 40)]
    await store.write_batch(
        events=[r[0] for r in rows],
        deliveries=[r[1] for r in rows],
        dead_letters=[r[2] for r in rows],
    )
    settings = Settings(event_retention_days=30, dead_letter_retention_days=30)
    log = structlog.wrap_logger(None, processors=[lambda *a: ""])
    retention = Retention(settings, lambda: store, asyncio.Event(), log, stored_days_reader(client))
    assert retention.enabled
    result = await retention.prune_once(now=NOW)
    assert result is not None

    kept = {e.id for e in await store.query_events(limit=100)}
    assert kept == {
        "default-1", "default-10", "plain-1", "plain-10",  # the general 30 days
        "short-1",  # 3 days
        "long-1", "long-10", "long-40",  # 100 days: kept past the general period
    }  # fmt: skip
    assert (result.events, result.deliveries) == (4, 4)
    for e in await store.query_events(limit=100):
        assert [d.id for d in await store.query_deliveries(e.id)] == [f"d-{e.id}"]
    # dead letters: the general period for each tenant (stored_days is events and attempts)
    kept_letters = {d.id for d in await store.query_dead_letters(limit=100)}
    assert kept_letters == {
        f"l-{t}-{a}" for t in ("default", "short", "long", "plain") for a in (1, 10)
    }
    # a tenant prune touches only that tenant's rows
    again = await store.prune(events_before=NOW, tenant="plain")
    assert again.events == 2 and {e.id for e in await store.query_events(limit=100)} == {
        "default-1", "default-10", "short-1", "long-1", "long-10", "long-40"
    }  # fmt: skip


async def test_quotas_unreadable_skips_the_round(store: Store) -> None:
    """No general prune when the tenants' periods cannot be read: it could delete what a
    longer stored_days keeps."""
    await store.write_batch(events=[_rows("long", 40)[0]])

    async def broken() -> dict[str, int]:
        raise OSError("nats is down")

    log = structlog.wrap_logger(None, processors=[lambda *a: ""])
    retention = Retention(
        Settings(event_retention_days=30), lambda: store, asyncio.Event(), log, broken
    )
    assert await retention.prune_once(now=NOW) is None
    assert await store.get_event("long-40") is not None
