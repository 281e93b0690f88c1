"""Tenants: the store and quotas, and isolation over the HTTP API (real broker, real HTTP).

The isolation test walks the whole route table, so a route added later is covered
without touching this file: with tenant A's key, every route that names one of B's
resources answers 404 (never 403), and no answer mentions B's resources.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mesh.apikeys import ApiKeyStore, Scope
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import Conflict, NotFound, ValidationError
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.tenants import DEFAULT, PublishQuota, QuotaExceeded, Quotas, TenantStore, delete_empty
from services.api import Api
from services.api.routes import route_table
from tests.support.api import Http, api_running, make_key


@pytest.fixture
async def api(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    async with api_running(settings) as a:
        yield a


async def tenant_key(client: MeshClient, tenant: str, scope: str = "admin") -> str:
    store = await ApiKeyStore.open(client.port, client.names.apikeys)
    _, key = await store.create(f"{tenant}-key", Scope(scope), tenant=tenant)
    return key


def test_publish_quota_refuses_past_the_rate_and_spends_nothing() -> None:
    q = PublishQuota()
    q.take("a", 5.0, 5)  # a second's burst
    with pytest.raises(QuotaExceeded) as exc:
        q.take("a", 5.0, 1)
    assert exc.value.retry_after_s > 0
    q.take("b", 5.0, 5)  # another tenant's bucket is its own
    q.take("a", None, 1000)  # no quota: no limit
    with pytest.raises(QuotaExceeded):
        q.take("c", 2.0, 3)  # more than the burst at once
    q.take("c", 2.0, 2)  # ... and the refusal spent nothing


async def test_tenant_store_lifecycle(client: MeshClient) -> None:
    store = await TenantStore.open(client.port, client.names.tenants)
    keys = await ApiKeyStore.open(client.port, client.names.apikeys)
    assert [t.name for t in await store.list()] == [DEFAULT]
    await store.create("acme", Quotas(max_targets=2))
    with pytest.raises(Conflict):
        await store.create("acme")
    with pytest.raises(ValidationError):
        await store.create("Not A Name")
    with pytest.raises(Conflict):
        await store.create(DEFAULT)
    t = await store.set_quotas("acme", events_per_s=10.0)
    assert (t.quotas.events_per_s, t.quotas.max_targets) == (10.0, 2)
    t = await store.set_quotas("acme", max_targets=None)
    assert t.quotas.max_targets is None and (await store.get("acme")).quotas.events_per_s == 10
    assert [t.name for t in await store.list()] == [DEFAULT, "acme"]

    await client.add_target(Target(name="acme-hook", kind=TargetKind.NATS, tenant="acme"))
    with pytest.raises(Conflict, match="1 targets"):
        await delete_empty(store, client.registry, keys, "acme")
    await client.remove_target("acme-hook")
    await delete_empty(store, client.registry, keys, "acme")
    with pytest.raises(NotFound):
        await store.get("acme")
    with pytest.raises(Conflict):
        await store.delete(DEFAULT)


async def test_broadcast_never_crosses_tenants(client: MeshClient) -> None:
    store = await TenantStore.open(client.port, client.names.tenants)
    await store.create("a")
    await client.add_target(Target(name="a-sink", kind=TargetKind.NATS, tenant="a"))
    await client.add_target(Target(name="d-sink", kind=TargetKind.NATS))
    await client.registry.add_propagation(PropagationMode.BROADCAST, "orders")  # default's
    assert await client.registry.routes_for("d-sink") == [("orders", None)]
    assert await client.registry.routes_for("a-sink") == []
    # a tenant's propagation cannot name another tenant's target (the same words as missing)
    with pytest.raises(NotFound, match="unknown target 'd-sink'"):
        await client.registry.add_propagation(
            PropagationMode.UNIDIRECTIONAL, "shop", ["d-sink"], tenant="a"
        )


def _fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


async def test_a_tenant_key_gets_404_for_every_route_about_another_tenant(
    api: Api, client: MeshClient
) -> None:
    _, operator = await make_key(client, "admin")
    async with Http(api.url, operator) as http:
        for name in ("ta", "tb"):
            status, _, body = await http.call("POST", "/v1/tenants", {"name": name})
            assert status == 201, body
        status, _, b_target = await http.call(
            "POST", "/v1/targets", {"name": "tb-hook", "kind": "nats", "tenant": "tb"}
        )
        assert status == 201 and b_target["tenant"] == "tb", b_target
        status, _, b_prop = await http.call(
            "POST",
            "/v1/propagations",
            {"mode": "unidirectional", "source": "tb-shop", "targets": ["tb-hook"], "tenant": "tb"},
        )
        assert status == 201 and b_prop["tenant"] == "tb", b_prop

    a_key = await tenant_key(client, "ta")
    async with Http(api.url, a_key) as http:
        # A works in its own tenant: the 404s below are not a key that does nothing
        status, _, own = await http.call("POST", "/v1/targets", {"name": "ta-hook", "kind": "nats"})
        assert status == 201 and own["tenant"] == "ta", own
        status, _, _ = await http.call("GET", "/v1/targets/ta-hook")
        assert status == 200
        status, _, bad = await http.call(
            "POST", "/v1/targets", {"name": "ta-x", "kind": "nats", "tenant": "tb"}
        )
        assert status == 422, bad

        b_values = {
            "name": "tb-hook",
            "id": b_prop["id"],
            "tenant": "tb",
            "jti": "0" * 32,
            "ident": "1",
        }
        ghost_values = {**b_values, "name": "zz-ghost", "id": "ghost0000000", "tenant": "zz-ghost"}
        secrets_of_b = ("tb-hook", b_prop["id"], "tb-shop", '"tb"')
        checked = 0
        for route in route_table().routes:
            if route.scope is None:
                continue  # the document and the reference page: nobody's resources
            # a well-formed body, so that what is checked is the resource, not the body
            req: dict[str, Any] = {"from_seq": 1} if route.operation_id == "replayTarget" else {}
            status, _, body = await http.call(route.method, _fill(route.path, b_values), req)
            text = json.dumps(body)
            what = f"{route.method} {route.path} -> {status} {text[:200]}"
            assert status != 403, what
            if route.path_params():
                # exactly what a resource that does not exist gets: nothing to tell them apart
                ghost = await http.call(route.method, _fill(route.path, ghost_values), req)
                assert status == ghost[0] == 404, what
                for k, v in b_values.items():
                    text = text.replace(v, ghost_values[k])
                assert text == json.dumps(ghost[2]), what
            else:
                for s in secrets_of_b:
                    assert s not in text, what
            checked += 1
        assert checked >= 30  # the whole table (34 routes when written)

        # the GraphQL endpoint: B's target is not there, A's is
        query = '{ targets { name tenant } target(name: "tb-hook") { name } }'
        status, _, body = await http.call("POST", "/v1/graphql", {"query": query})
        assert status == 200, body
        assert body["data"]["target"] is None
        assert [t["name"] for t in body["data"]["targets"]] == ["ta-hook"]
        # ... and the history reads through the tenant's view (tests/test_tenants_history.py)
        query = "{ events { items { id } } deliveries { items { id } } }"
        status, _, body = await http.call("POST", "/v1/graphql", {"query": query})
        assert status == 200 and not body.get("errors"), body
        assert body["data"] == {"events": {"items": []}, "deliveries": {"items": []}}

    # the operator still sees both tenants' resources
    async with Http(api.url, operator) as http:
        status, _, listed = await http.call("GET", "/v1/targets")
        assert {t["name"] for t in listed} == {"ta-hook", "tb-hook"}
        assert (await http.call("GET", "/v1/targets/tb-hook"))[0] == 200
        status, _, tenants = await http.call("GET", "/v1/tenants")
        assert [t["name"] for t in tenants] == [DEFAULT, "ta", "tb"]
        status, _, held = await http.call("DELETE", "/v1/tenants/tb")
        assert status == 409 and "1 targets" in held["detail"], held


async def test_target_quota_over_the_api(api: Api, client: MeshClient) -> None:
    store = await TenantStore.open(client.port, client.names.tenants)
    await store.create("small", Quotas(max_targets=1))
    key = await tenant_key(client, "small")
    async with Http(api.url, key) as http:
        assert (await http.call("POST", "/v1/targets", {"name": "s-1", "kind": "nats"}))[0] == 201
        status, _, body = await http.call("POST", "/v1/targets", {"name": "s-2", "kind": "nats"})
        assert status == 409 and "quota of 1 targets" in body["detail"], body
        status, _, mine = await http.call("GET", "/v1/tenants/small")
        assert status == 200 and mine["quotas"]["max_targets"] == 1
        assert (await http.call("GET", "/v1/tenants/default"))[0] == 404
        status, _, listed = await http.call("GET", "/v1/tenants")
        assert [t["name"] for t in listed] == ["small"]


def test_tenant_slots_cap_a_tenant_only_when_tenants_share_the_egress() -> None:
    from services.egress.fairness import TenantSlots

    slots = TenantSlots(total=100, share=0.25)
    slots.add("default")
    slots.add("default")
    assert slots.cap() == 100  # one tenant (every mesh without tenants): as before
    assert slots.slot("default")._value == 100
    slots.add("tb")
    assert slots.cap() == 25
    assert slots.slot("tb")._value == 25 and slots.slot("default")._value == 25
    slots.remove("tb")
    assert slots.cap() == 100 and "tb" not in slots.active
    assert slots.slot("default")._value == 100
