"""Target names per tenant: tenants ta and tb (and the default tenant) each hold a target
``orders``, each fully apart: registry entry, consumer, DLQ and record subjects, replay,
REST, GraphQL and the CLI; and a tenant's target made before (named mesh-wide) keeps its
consumer, backlog and dead letters. Real nats-server, real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from mesh.apikeys import ApiKeyStore, Scope
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import Conflict, ValidationError
from mesh.ownership import find_target
from mesh.registry import Target, TargetKind
from mesh.revocations import RevocationStore
from mesh.subjects import (
    Subjects,
    consumer_of,
    consumer_ref,
    key_ref,
    ref_key,
    target_ref,
    validate_target_ref,
)
from mesh.tenants import TenantStore
from mesh.tokens import key_path, load_key, verify
from services.api import Api
from tests.conftest import env_for
from tests.support import eventually
from tests.support.api import Http, api_running, make_key
from tests.support.cli import ok
from tests.support.feeds import collect, queued
from tests.support.inproc import mesh_inproc

TENANTS = ("ta", "tb")


def test_target_references_keys_consumers_and_subjects() -> None:
    s = Subjects()
    # the default tenant: exactly as before
    assert target_ref("default", "orders") == "orders" == target_ref(None, "orders")
    assert ref_key("orders") == "targets.orders" and key_ref("targets.orders") == "orders"
    assert consumer_of("orders") == "deliver-orders" == consumer_of(target_ref(None, "orders"))
    assert s.dlq("orders") == "mesh.dlq.orders"
    assert s.parse_event("mesh.replay.orders.shop.a.b") == ("shop", "a.b", "orders")
    # a tenant's: qualified like its sources, keyed and named without '~' where it cannot go
    ref = target_ref("ta", "orders")
    assert ref == "~ta.orders" and validate_target_ref(ref) == ref
    assert ref_key(ref) == "targets.ta.orders" and key_ref("targets.ta.orders") == ref
    assert consumer_of(ref) == "deliver-ta~orders" and consumer_ref("deliver-ta~orders") == ref
    assert consumer_ref("deliver-orders") == "orders" and consumer_ref("sink-events") is None
    assert key_ref("props.abc") is None
    assert s.dlq(ref) == "mesh.dlq.~ta.orders"
    assert s.delivery(ref) == "mesh.sys.delivery.~ta.orders"
    assert s.target_of("mesh.dlq.~ta.orders", "dlq") == ref
    assert s.target_of("mesh.sys.delivery.orders", "delivery") == "orders"
    assert s.parse_event(s.replay(ref, "~ta.shop", "a.b")) == ("~ta.shop", "a.b", ref)
    with pytest.raises(ValidationError):
        validate_target_ref("~ta.Orders")


@pytest.fixture
async def api(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    async with api_running(settings) as a:
        yield a


async def _keys(client: MeshClient) -> dict[str, str]:
    tenants = await TenantStore.open(client.port, client.names.tenants)
    keys = await ApiKeyStore.open(client.port, client.names.apikeys)
    out = {}
    for t in TENANTS:
        await tenants.create(t)
        out[t] = (await keys.create(f"{t}-key", Scope.ADMIN, tenant=t))[1]
    return out


async def _graph(http: Http, query: str) -> dict[str, Any]:
    status, _, body = await http.call("POST", "/v1/graphql", {"query": query})
    assert status == 200 and not body.get("errors"), body
    data: dict[str, Any] = body["data"]
    return data


async def test_two_tenants_each_have_their_own_orders(
    api: Api, client: MeshClient, settings: Settings
) -> None:
    keys = await _keys(client)
    since = datetime.now(UTC) - timedelta(seconds=1)
    for t in TENANTS:
        async with Http(api.url, keys[t]) as http:
            status, _, body = await http.call(
                "POST", "/v1/targets", {"name": "orders", "kind": "nats"}
            )
            assert status == 201 and body["tenant"] == t, body  # tb: no 409, nothing leaks
            assert body["ref"] == f"~{t}.orders", body
            status, _, body = await http.call(
                "POST",
                "/v1/propagations",
                {"mode": "unidirectional", "source": "shop", "targets": ["orders"]},
            )
            assert status == 201, body
            for _ in range(2):
                status, _, body = await http.call(
                    "POST", "/v1/events", {"source": "shop", "type": "order.created", "data": t}
                )
                assert status == 202, body
            # its own again: a conflict within its tenant
            status, _, body = await http.call(
                "POST", "/v1/targets", {"name": "orders", "kind": "nats"}
            )
            assert status == 409, body
    await client.add_target(Target(name="orders", kind=TargetKind.NATS))  # the default's
    await client.add_propagation("unidirectional", "shop", ["orders"])
    await client.publish("shop", "order.created", "default")

    # one consumer each, by its own name; the default's as before
    names = set(await client.port.consumer_names(client.names.events))
    assert {"deliver-orders", "deliver-ta~orders", "deliver-tb~orders"} <= names
    for t in TENANTS:
        assert await find_target(client.registry, "orders", t) == await client.registry.get_target(
            f"~{t}.orders"
        )

    # each tenant's client reads its own orders: its own events only
    got: dict[str, list[Any]] = {}
    for t in TENANTS:
        async with MeshClient(settings.model_copy(update={"tenant": t}), name=t) as c:
            deliveries = []
            async for d in c.consume("orders", expires=0.25):
                deliveries.append(d)
                if len(deliveries) == 2:
                    break
            got[t] = [d.event.data for d in deliveries]
            assert {d.event.source for d in deliveries} == {f"~{t}.shop"}
            # the first event dies: onto the tenant's own DLQ subject
            await c.deliveries.dead_letter(deliveries[0].msg, deliveries[0].target, "boom", 1)
            for d in deliveries:
                await d.ack()
    assert got == {"ta": ["ta", "ta"], "tb": ["tb", "tb"]}
    assert [e.data for e in await collect(client, "orders", 1)] == ["default"]
    for t in TENANTS:
        assert await queued(client, f"~{t}.orders") == 0
    depths = await client.deliveries.dlq_depths()
    assert depths.get("~ta.orders") == 1 and depths.get("~tb.orders") == 1, depths

    # REST: each sees its own target and dead letters; the other's reference is a 404
    for t, other in (("ta", "tb"), ("tb", "ta")):
        async with Http(api.url, keys[t]) as http:
            status, _, body = await http.call("GET", "/v1/targets/orders")
            assert status == 200 and body["tenant"] == t, body
            status, _, listed = await http.call("GET", "/v1/targets")
            assert [x["ref"] for x in listed] == [f"~{t}.orders"], listed
            status, _, page = await http.call("GET", "/v1/dead-letters?target=orders")
            assert status == 200, page
            assert [(x["target"], x["tenant"]) for x in page["items"]] == [("orders", t)]
            ghost = await http.call("GET", "/v1/targets/no-such")
            for path in (
                f"/v1/targets/~{other}.orders",
                f"/v1/dead-letters?target=~{other}.orders",
                f"/v1/deliveries?target=~{other}.orders",
            ):
                status, _, body = await http.call("GET", path)
                assert status == ghost[0] == 404, (path, body)
                assert f"~{other}" not in json.dumps(ghost[2])
            data = await _graph(http, "{ targets { name tenant ref } }")
            assert data["targets"] == [{"name": "orders", "tenant": t, "ref": f"~{t}.orders"}]
            other_graph = await _graph(http, f'{{ target(name: "~{other}.orders") {{ ref }} }}')
            assert other_graph["target"] is None

            # replay of A reaches A's target alone
            status, _, body = await http.call(
                "POST", "/v1/targets/orders/replay", {"since": since.isoformat()}
            )
            assert status == 200 and body["published"] == 2, body
            assert await queued(client, f"~{t}.orders") == 2
            assert await queued(client, f"~{other}.orders") == 0
            assert await queued(client, "orders") == 0
            assert len(await collect(client, f"~{t}.orders", 2)) == 2

    # an operator key: every tenant's, told apart
    _, operator = await make_key(client, "admin")
    async with Http(api.url, operator) as http:
        status, _, listed = await http.call("GET", "/v1/targets")
        assert sorted((x["ref"], x["tenant"]) for x in listed) == [
            ("orders", "default"),
            ("~ta.orders", "ta"),
            ("~tb.orders", "tb"),
        ]
        status, _, body = await http.call("GET", "/v1/targets/~tb.orders")
        assert status == 200 and body["tenant"] == "tb", body
        status, _, body = await http.call("GET", "/v1/targets/orders")
        assert status == 200 and body["tenant"] == "default", body
        status, _, page = await http.call("GET", "/v1/dead-letters?target=~ta.orders")
        assert [x["tenant"] for x in page["items"]] == ["ta"], page
        data = await _graph(http, "{ targets { ref } }")
        assert sorted(x["ref"] for x in data["targets"]) == ["orders", "~ta.orders", "~tb.orders"]

    # removing one tenant's orders leaves the others'
    async with Http(api.url, keys["ta"]) as http:
        status, _, body = await http.call("DELETE", "/v1/targets/orders")
        assert status == 200, body
    await client.provisioner.reconcile_all()
    names = set(await client.port.consumer_names(client.names.events))
    assert "deliver-ta~orders" not in names
    assert {"deliver-orders", "deliver-tb~orders"} <= names


async def test_the_cli_scopes_target_names_by_mesh_tenant(
    settings: Settings, client: MeshClient
) -> None:
    env = env_for(settings)
    await _keys(client)
    for t in TENANTS:
        ok(
            await mesh_inproc(
                {**env, "MESH_TENANT": t}, "target", "add", "orders", "--kind", "nats"
            )
        )
    for t in TENANTS:
        listed = ok(await mesh_inproc({**env, "MESH_TENANT": t}, "target", "list", "--json"))
        assert [(x["ref"], x["tenant"]) for x in json.loads(listed.stdout)] == [(f"~{t}.orders", t)]
    everyone = json.loads(ok(await mesh_inproc(env, "target", "list", "--json")).stdout)
    assert sorted(x["ref"] for x in everyone) == ["~ta.orders", "~tb.orders"]
    # the operator's plain name is ambiguous now: it asks for the reference
    with pytest.raises(ValidationError, match="held by several tenants"):
        await client.target_or_error("orders")
    ok(await mesh_inproc({**env, "MESH_TENANT": "ta"}, "target", "remove", "orders"))
    assert [t.ref for t in await client.registry.list_targets()] == ["~tb.orders"]


async def test_a_tenant_target_made_before_keeps_its_names_backlog_and_dead_letters(
    api: Api, client: MeshClient, settings: Settings
) -> None:
    """An upgrade: ta's ``orders`` as the registry held it before (``targets.orders``, no
    ``scoped``), with its consumer ``deliver-orders``, a backlog and a dead letter."""
    keys = await _keys(client)
    old = Target(name="orders", kind=TargetKind.NATS, tenant="ta")
    await client.registry.kv.put("targets.orders", old.model_dump_json(exclude={"scoped"}).encode())
    await client.registry.add_propagation("unidirectional", "shop", ["orders"], tenant="ta")
    await client.provisioner.reconcile_all()
    ta = settings.model_copy(update={"tenant": "ta"})
    async with MeshClient(ta, name="ta") as c:
        for i in range(3):
            await c.publish("shop", "order.created", i)
        async for d in c.consume("orders", expires=0.25):
            assert d.target == "orders"  # its reference is still its name
            await c.deliveries.dead_letter(d.msg, d.target, "old failure", 5)
            await d.ack()
            break
    found = await client.registry.get_target("orders")
    assert (found.tenant, found.scoped, found.consumer) == ("ta", False, "deliver-orders")
    assert await queued(client, "orders") == 2  # the backlog, on the consumer it always had
    assert (await client.deliveries.dlq_depths()).get("orders") == 1

    # after the upgrade: ta still finds it by name, with its position and dead letter
    async with Http(api.url, keys["ta"]) as http:
        status, _, body = await http.call("GET", "/v1/targets/orders")
        assert status == 200 and body["ref"] == "orders" and body["tenant"] == "ta", body
        status, _, page = await http.call("GET", "/v1/dead-letters?target=orders")
        assert [(x["error"], x["tenant"]) for x in page["items"]] == [("old failure", "ta")]
        status, _, body = await http.call("POST", "/v1/targets", {"name": "orders", "kind": "nats"})
        assert status == 409, body  # its own name, still
    async with MeshClient(ta, name="ta") as c:
        data = [e.data for e in await collect(c, "orders", 2)]
    assert data == [1, 2]
    # tb's orders: a name of its own, no conflict with ta's older one
    async with Http(api.url, keys["tb"]) as http:
        status, _, body = await http.call("POST", "/v1/targets", {"name": "orders", "kind": "nats"})
        assert status == 201 and body["ref"] == "~tb.orders", body
        status, _, body = await http.call("GET", "/v1/dead-letters?target=orders")
        assert status == 200 and body["items"] == [], body
    # the default tenant cannot take the key ta's older target holds
    with pytest.raises(Conflict):
        await client.add_target(Target(name="orders", kind=TargetKind.NATS))


async def test_the_egress_and_the_history_keep_each_tenants_orders_apart(
    client: MeshClient, settings: Settings, db_url: str
) -> None:
    """Real egress, sink, API and receiver: ta's and tb's webhook ``orders`` each get their
    tenant's events, each attempt is recorded on its own target's record subject, and each
    tenant reads only its own deliveries and dead letters over REST and GraphQL."""
    from services.egress import WebhookEgress
    from services.sink import Sink
    from tests.support.receiver import Receiver, Reply, fast_policy

    keys = await _keys(client)
    s = settings.model_copy(update={"db_url": db_url})
    sink = Sink(s, batch_size=100, fetch_wait=0.2)
    egress = WebhookEgress(s, fetch_expires_s=0.5)
    ids: dict[str, list[str]] = {}
    subjects: set[str] = set()
    async with Receiver() as rx, Receiver(Reply(500, body=b"tb is down")) as down:
        for t, url in (("ta", rx.url), ("tb", down.url)):
            await client.add_target(
                Target(
                    name="orders",
                    kind=TargetKind.WEBHOOK,
                    url=url,
                    tenant=t,
                    retry=fast_policy(max_retries=1),
                    circuit_threshold=50,
                )
            )
            await client.registry.add_propagation("unidirectional", "shop", ["orders"], tenant=t)
        await client.provisioner.reconcile_all()
        for t in TENANTS:
            async with MeshClient(settings.model_copy(update={"tenant": t}), name=t) as c:
                ids[t] = [
                    await c.publish("shop", "order.created", {"tenant": t, "n": i})
                    for i in range(2)
                ]
        await sink.start()
        await egress.start()
        try:
            got = await rx.wait_for(2, timeout=20)
            wanted = {"mesh.sys.delivery.~ta.orders", "mesh.sys.delivery.~tb.orders"}

            async def recorded() -> bool:
                info = await client.port.stream_info(
                    client.names.sys, subjects_filter=client.subjects.delivery_all
                )
                subjects.update(info.state.subjects or {})
                dead = (await client.deliveries.dlq_depths()).get("~tb.orders", 0)
                return wanted <= subjects and dead == 2

            await eventually(recorded, timeout=30, what="both tenants' records, tb's dead letters")
            async with api_running(s) as api:
                await _history_apart(api, keys, ids, client)
        finally:
            await egress.stop()
            await sink.stop()
    assert {r.json()["data"]["tenant"] for r in got} == {"ta"}
    assert "mesh.sys.delivery.orders" not in subjects


async def _history_apart(
    api: Api, keys: dict[str, str], ids: dict[str, list[str]], client: MeshClient
) -> None:
    async def rows(http: Http, path: str, n: int) -> list[dict[str, Any]]:
        async def enough() -> list[dict[str, Any]] | None:
            status, _, page = await http.call("GET", path)
            assert status == 200, page
            return page["items"] if len(page["items"]) >= n else None

        found: list[dict[str, Any]] = await eventually(enough, timeout=20, what=path)
        return found

    for t, other in (("ta", "tb"), ("tb", "ta")):
        async with Http(api.url, keys[t]) as http:
            got = await rows(http, "/v1/deliveries?target=orders", 2)
            assert {d["event_id"] for d in got} == set(ids[t])
            data = await _graph(
                http,
                '{ deliveries(target: "orders") { items { eventId } }'
                " targets { ref deliveries { items { eventId } } } }",
            )
            assert {d["eventId"] for d in data["deliveries"]["items"]} == set(ids[t])
            [node] = data["targets"]
            assert node["ref"] == f"~{t}.orders"
            assert {d["eventId"] for d in node["deliveries"]["items"]} == set(ids[t])
            assert not set(json.dumps(data).split('"')) & set(ids[other])
            status, _, page = await http.call("GET", "/v1/dead-letters?target=orders")
            assert status == 200, page
            assert {x["event_id"] for x in page["items"]} == (set(ids[t]) if t == "tb" else set())
    _, operator = await make_key(client, "read")
    async with Http(api.url, operator) as http:  # every tenant's, each under its own name
        for t in TENANTS:
            got = await rows(http, f"/v1/deliveries?target=~{t}.orders", 2)
            assert {d["event_id"] for d in got} == set(ids[t]), got
            data = await _graph(
                http, f'{{ deliveries(target: "~{t}.orders") {{ items {{ eventId }} }} }}'
            )
            assert {d["eventId"] for d in data["deliveries"]["items"]} == set(ids[t])


async def test_request_reply_reaches_the_askers_tenants_orders(
    client: MeshClient, settings: Settings
) -> None:
    """ta's and tb's ``orders`` both answer requests (bidirectional with ``crm`` in each
    tenant): each tenant's request reaches its own ``orders`` only."""
    await _keys(client)
    clients = {}
    subs = []
    try:
        for t in TENANTS:
            c = clients[t] = MeshClient(settings.model_copy(update={"tenant": t}), name=t)
            await c.connect()
            for name in ("crm", "orders"):
                await c.add_target(Target(name=name, kind=TargetKind.NATS, tenant=t))
            await c.add_propagation("bidirectional", "crm", ["orders"])

            async def answer(e: Any, t: str = t) -> Any:
                return {"answered_by": t, "asked_by": e.source}

            subs.append(await c.serve_requests("orders", answer))
        for t in TENANTS:
            r = await clients[t].request("crm", "orders", "price.get", {}, timeout=5)
            assert (r.status, r.data) == (200, {"answered_by": t, "asked_by": f"~{t}.crm"})
    finally:
        for sub in subs:
            await sub.unsubscribe()
        for c in clients.values():
            await c.close()


async def _page(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_each_tenants_portal_manages_its_own_orders(api: Api, client: MeshClient) -> None:
    """A portal session (a signed link's) works on its tenant's ``orders`` alone."""
    await _keys(client)
    for t in TENANTS:
        await client.add_target(Target(name="orders", kind=TargetKind.NATS, tenant=t))
    _, admin = await make_key(client, "admin")
    sessions = {}
    async with Http(api.url, admin) as http:
        for t in TENANTS:
            status, _, doc = await http.call("POST", "/v1/portal/links", {"tenant": t})
            assert status == 201, doc
            page = await _page(doc["url"])
            sessions[t] = page.split('name=mesh-session content="', 1)[1].split('"', 1)[0]
        for t, other in (("ta", "tb"), ("tb", "ta")):
            status, _, listed = await http.call("GET", "/v1/targets", key=sessions[t])
            assert [(x["name"], x["tenant"]) for x in listed] == [("orders", t)], listed
            status, _, body = await http.call("POST", "/v1/targets/orders/pause", key=sessions[t])
            assert status == 200 and body["status"] == "disabled", body
            assert (await client.registry.get_target(f"~{t}.orders")).status == "disabled"
            assert (await client.registry.get_target(f"~{other}.orders")).status == "active"
            status, _, body = await http.call("POST", "/v1/targets/orders/resume", key=sessions[t])
            assert status == 200 and body["status"] == "active", body
            status, _, _ = await http.call("GET", f"/v1/targets/~{other}.orders", key=sessions[t])
            assert status == 404


async def test_revoking_one_tenants_target_tokens_spares_the_other_tenants(
    api: Api, client: MeshClient, settings: Settings
) -> None:
    """Bridge tokens of `~ta.orders` revoked by an operator: `~tb.orders`'s still open."""
    await _keys(client)
    for t in TENANTS:
        await client.add_target(Target(name="orders", kind=TargetKind.NATS, tenant=t))
    _, admin = await make_key(client, "admin")
    key = load_key(key_path(settings))
    issued = {}
    async with Http(api.url, admin) as http:
        for t in TENANTS:
            body = {"target": f"~{t}.orders", "ttl_s": 600}
            status, _, doc = await http.call("POST", "/v1/tokens", body)
            assert status == 201, doc
            issued[t] = verify(key, doc["token"], "orders")
            assert issued[t].tenant == t
        status, _, rev = await http.call(
            "POST", "/v1/targets/~ta.orders/revoke-tokens", {"reason": "rotation"}
        )
        assert status == 200, rev
        assert (rev["revocation"]["id"], rev["revocation"]["tenant"]) == ("orders", "ta")
    store = await RevocationStore.open(client.port, client.names.revoked)
    refusal = await store.refusal(issued["ta"])
    assert refusal is not None and "target ~ta.orders" in refusal.describe()
    assert await store.refusal(issued["tb"]) is None
