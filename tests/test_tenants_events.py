"""Tenants on the data path: subjects, consumers, replay, publish quotas (real broker, HTTP).

Tenants A and B both have a source named ``shop``: A's events reach A's targets only;
B's consumers never hold them, a client of tenant A (MESH_TENANT) cannot consume B's
target, and replaying A re-injects on A's target alone.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from mesh.apikeys import ApiKeyStore, Scope
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.envelope import Event, outward
from mesh.errors import NotFound
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.replay import replay
from mesh.subjects import Subjects, qualify, split_source
from mesh.tenants import QuotaExceeded, Quotas, TenantStore
from services.api import Api, quotas
from tests.support.api import Http, api_running
from tests.support.feeds import collect, queued


def test_qualified_sources_and_subjects() -> None:
    s = Subjects()
    assert qualify("default", "shop") == "shop" and qualify(None, "shop") == "shop"
    assert qualify("ta", "shop") == "~ta.shop"
    assert split_source("~ta.shop") == ("ta", "shop")
    assert split_source("shop") == ("default", "shop")
    assert s.evt("shop", "order.created") == "mesh.evt.shop.order.created"  # unchanged
    assert s.evt("~ta.shop", "order.created") == "mesh.evt.~ta.shop.order.created"
    assert s.parse_event("mesh.evt.~ta.shop.order.created") == ("~ta.shop", "order.created", None)
    assert s.parse_event("mesh.evt.shop.order.created") == ("shop", "order.created", None)
    assert s.parse_event("mesh.replay.t1.~ta.shop.a.b") == ("~ta.shop", "a.b", "t1")
    assert s.evt_tenant("ta") == "mesh.evt.~ta.>"


@pytest.fixture
async def api(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    async with api_running(settings) as a:
        yield a


async def _two_tenants(client: MeshClient) -> None:
    tenants = await TenantStore.open(client.port, client.names.tenants)
    for name in ("ta", "tb"):
        await tenants.create(name)
        await client.add_target(Target(name=f"{name}-sink", kind=TargetKind.NATS, tenant=name))
        await client.registry.add_propagation(
            PropagationMode.UNIDIRECTIONAL, "shop", [f"{name}-sink"], tenant=name
        )
    await client.add_target(Target(name="d-sink", kind=TargetKind.NATS))
    await client.registry.add_propagation(PropagationMode.BROADCAST, "shop")
    await client.provisioner.reconcile_all()


async def test_tenants_events_stay_apart_through_consume_and_replay(
    api: Api, client: MeshClient, settings: Settings
) -> None:
    await _two_tenants(client)
    keys = await ApiKeyStore.open(client.port, client.names.apikeys)
    _, a_key = await keys.create("a", Scope.PUBLISH, tenant="ta")
    since = datetime.now(UTC) - timedelta(seconds=1)
    async with Http(api.url, a_key) as http:
        for i in range(3):
            status, _, body = await http.call(
                "POST", "/v1/events", {"source": "shop", "type": "order.created", "data": i}
            )
            assert status == 202, body
    await client.publish("shop", "order.created", "default's")  # the default tenant's shop

    got = await collect(client, "ta-sink", 3)
    assert [e.data for e in got] == [0, 1, 2]
    assert {e.source for e in got} == {"~ta.shop"}
    assert await queued(client, "tb-sink") == 0  # B's same-named source is another source
    default_got = await collect(client, "d-sink", 1)
    assert [e.data for e in default_got] == ["default's"]  # a default broadcast: not A's

    # a client of tenant A: its own target, never B's
    a_settings = settings.model_copy(update={"tenant": "ta"})
    async with MeshClient(a_settings, name="tenant-a") as a_client:
        with pytest.raises(NotFound, match="unknown target 'tb-sink'"):
            async for _ in a_client.consume("tb-sink"):
                pass
        event = a_client.build("shop", "order.created", 9)
        assert event.source == "~ta.shop"  # its sources are its tenant's

    result = await replay(client, "ta-sink", since)
    assert result.published == 3
    assert len(await collect(client, "ta-sink", 3)) == 3
    assert await queued(client, "tb-sink") == 0 and await queued(client, "d-sink") == 0


async def test_publish_quota_at_the_api_and_the_client(
    api: Api, client: MeshClient, settings: Settings
) -> None:
    tenants = await TenantStore.open(client.port, client.names.tenants)
    await tenants.create("slow", Quotas(events_per_s=2))
    keys = await ApiKeyStore.open(client.port, client.names.apikeys)
    _, key = await keys.create("slow", Scope.PUBLISH, tenant="slow")
    event = {"source": "shop", "type": "a.b"}
    async with Http(api.url, key) as http:
        statuses = [(await http.call("POST", "/v1/events", event))[0] for _ in range(4)]
        assert statuses[:2] == [202, 202] and 429 in statuses[2:], statuses
        status, headers, body = await http.call("POST", "/v1/events:batch", {"events": [event] * 5})
        assert status == 429 and int(headers["Retry-After"]) >= 1, body
        assert "quota of 2 events/s" in body["detail"]
    async with MeshClient(settings.model_copy(update={"tenant": "slow"}), name="slow") as c:
        await c.publish("shop", "a.b", 1)
        await c.publish("shop", "a.b", 2)
        with pytest.raises(QuotaExceeded, match="quota of 2 events/s"):
            await c.publish("shop", "a.b", 3)


def test_outward_shows_the_plain_source_and_the_tenant_apart() -> None:
    ev = Event(source="~ta.shop", type="a.b", origin="~ta.pos", extensions={"x": "1"})
    out = outward(ev)
    assert (out.source, out.origin, out.extensions) == ("shop", "pos", {"x": "1", "tenant": "ta"})
    assert ev.source == "~ta.shop" and ev.extensions == {"x": "1"}  # the original unchanged
    plain = Event(source="shop", type="a.b")
    assert outward(plain) is plain  # the default tenant's: as it was


async def test_a_tenant_webhook_gets_the_plain_source_and_the_tenant_header(
    client: MeshClient, settings: Settings
) -> None:
    """Real egress and receiver: CloudEvents format (ce-source, ce-tenant) and the standard
    format (webhook-tenant), against a default-tenant target that gets neither."""
    from services.egress import WebhookEgress
    from tests.support.receiver import Receiver

    await (await TenantStore.open(client.port, client.names.tenants)).create("ta")
    async with Receiver() as rx:
        for name, tenant, fmt in (
            ("ta-ce", "ta", "cloudevents"),
            ("ta-std", "ta", "standard"),
            ("d-ce", "default", "cloudevents"),
        ):
            url = f"http://127.0.0.1:{rx.port}/{name}"  # the path tells them apart
            await client.add_target(
                Target(name=name, kind=TargetKind.WEBHOOK, url=url, tenant=tenant, format=fmt)
            )
            await client.registry.add_propagation(
                PropagationMode.UNIDIRECTIONAL, "shop", [name], tenant=tenant
            )
        await client.provisioner.reconcile_all()
        async with MeshClient(settings.model_copy(update={"tenant": "ta"}), name="ta") as ta:
            await ta.publish("shop", "order.created", {"n": 1})
        await client.publish("shop", "order.created", {"n": 2})
        egress = WebhookEgress(settings, fetch_expires_s=0.5)
        await egress.start()
        try:
            got = await rx.wait_for(3, timeout=20)
        finally:
            await egress.stop()
    heads = {r.path.strip("/"): r.headers for r in got}
    assert heads["ta-ce"]["ce-source"] == "shop" and heads["ta-ce"]["ce-tenant"] == "ta"
    assert "~" not in json.dumps(heads["ta-ce"])
    assert heads["ta-std"]["webhook-tenant"] == "ta"
    assert heads["d-ce"]["ce-source"] == "shop" and "ce-tenant" not in heads["d-ce"]
    assert "webhook-tenant" not in heads["d-ce"]


async def test_api_reads_a_quota_once_per_burst_and_at_once_after_a_change(
    api: Api, client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API caches a tenant's events/s quota (services/api/quotas.py): a burst of
    publishes reads it once, and a change through this instance applies at once."""
    tenants = await TenantStore.open(client.port, client.names.tenants)
    await tenants.create("later", Quotas())
    keys = await ApiKeyStore.open(client.port, client.names.apikeys)
    _, key = await keys.create("later", Scope.PUBLISH, tenant="later")
    _, admin = await keys.create("ops", Scope.ADMIN)
    event = {"source": "shop", "type": "a.b"}
    reads = 0
    get = TenantStore.get

    async def counted(self: TenantStore, name: str) -> object:
        nonlocal reads
        reads += 1
        return await get(self, name)

    # Longer than the burst can take on a loaded machine: the count does not hang on speed.
    monkeypatch.setattr(quotas, "RATE_CACHE_S", 3600.0)
    async with Http(api.url, key) as http:
        monkeypatch.setattr(TenantStore, "get", counted)
        statuses = [(await http.call("POST", "/v1/events", event))[0] for _ in range(10)]
        monkeypatch.setattr(TenantStore, "get", get)
        assert statuses == [202] * 10 and reads == 1, (statuses, reads)
        status, _, body = await http.call(
            "PATCH", "/v1/tenants/later/quota", {"events_per_s": 1}, key=admin
        )
        assert status == 200, body
        statuses = [(await http.call("POST", "/v1/events", event))[0] for _ in range(3)]
        assert 429 in statuses, statuses
