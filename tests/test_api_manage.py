"""Managing the mesh through the HTTP API: targets, propagations, bridge tokens, status,
and every change in the sink's audit_log with the key id (real broker, sink, HTTP)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from standardwebhooks import Webhook

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import TargetStatus
from mesh.revocations import RevocationStore
from mesh.storage import open_store
from mesh.tokens import key_path, load_key, verify
from services.api import Api
from services.health import Health
from services.sink import Sink
from tests.support import eventually, running
from tests.support.api import Http, api_running, make_key


@pytest.fixture
async def api(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    async with api_running(settings) as a:
        yield a


async def test_targets_lifecycle_through_the_api(
    api: Api, client: MeshClient, settings: Settings, capfd: pytest.CaptureFixture[str]
) -> None:
    admin_id, admin = await make_key(client, "admin")
    async with Http(api.url, admin) as http, running(Sink(settings, fetch_wait=0.2)):
        status, _, created = await http.call(
            "POST",
            "/v1/targets",
            {"name": "crm", "kind": "webhook", "url": "http://127.0.0.1:9/hook", "rate": 5},
        )
        assert status == 201, created
        secret = created["secret"]
        assert secret.startswith("whsec_") and created["has_secret"]
        assert "secret_enc" not in created
        # the secret signs what the egress sends: the registry holds the same one
        target = await client.registry.get_target("crm")
        assert client.registry.secrets_for(target) == [secret]
        Webhook(secret)  # a valid Standard Webhooks secret

        status, _, got = await http.call("GET", "/v1/targets/crm")
        assert status == 200 and "secret" not in got and got["rate"] == 5
        status, _, listed = await http.call("GET", "/v1/targets")
        assert [t["name"] for t in listed] == ["crm"]
        assert secret not in json.dumps(listed) and "secret" not in listed[0]

        status, _, dup = await http.call("POST", "/v1/targets", {"name": "crm", "kind": "nats"})
        assert status == 409 and dup["type"] == "urn:mesh:problem:conflict"

        patch = {
            "timeout_s": 7,
            "rate": None,
            "retry": {"max_retries": 2},
            "circuit_threshold": 3,
            "circuit_open_s": 30,
            "max_in_flight": 4,
            "ordered": True,
            "format": "cloudevents",
        }
        status, _, updated = await http.call("PATCH", "/v1/targets/crm", patch)
        assert status == 200, updated
        target = await client.registry.get_target("crm")
        assert (target.timeout_s, target.rate, target.retry.max_retries) == (7, None, 2)
        assert target.retry.base_s == 1.0  # the rest of the policy kept
        assert (target.circuit_threshold, target.max_in_flight, target.ordered) == (3, 4, True)
        assert target.format == "cloudevents"
        status, _, bad = await http.call("PATCH", "/v1/targets/crm", {"timeout_s": 0})
        assert status == 422 and bad["errors"][0]["loc"] == ["body", "timeout_s"]

        assert (await http.call("POST", "/v1/targets/crm/pause"))[0] == 200
        assert (await client.registry.get_target("crm")).status == TargetStatus.DISABLED
        assert (await http.call("POST", "/v1/targets/crm/resume"))[0] == 200
        assert (await client.registry.get_target("crm")).status == TargetStatus.ACTIVE

        status, _, rotated = await http.call(
            "POST", "/v1/targets/crm/rotate-secret", {"grace_s": 60}
        )
        assert status == 200 and rotated["secret"] != secret
        target = await client.registry.get_target("crm")
        assert client.registry.secrets_for(target) == [rotated["secret"], secret]
        status, _, got = await http.call("GET", "/v1/targets/crm")
        assert got["rotating"] is True and rotated["secret"] not in json.dumps(got)

        # propagations: all four modes
        await http.call("POST", "/v1/targets", {"name": "erp", "kind": "nats"})
        await http.call("POST", "/v1/targets", {"name": "bi", "kind": "nats"})
        made = {}
        for doc in [
            {"mode": "unidirectional", "source": "shop", "targets": ["crm"], "types": "order.*"},
            {"mode": "bidirectional", "source": "crm", "targets": ["erp"]},
            {"mode": "multicast", "source": "shop", "targets": ["erp", "bi"]},
            {"mode": "broadcast", "source": "alerts"},
        ]:
            status, _, prop = await http.call("POST", "/v1/propagations", doc)
            assert status == 201, prop
            made[prop["mode"]] = prop["id"]
        # filters and transforms (mesh/cesql, mesh/transform), checked when created
        status, _, filtered = await http.call(
            "POST",
            "/v1/propagations",
            {
                "mode": "unidirectional",
                "source": "billing",
                "targets": ["crm"],
                "filter": "type = 'invoice.paid' AND data.total > 100",
                "transform": "{id: data.id}",
            },
        )
        assert status == 201, filtered
        made["filtered"] = filtered["id"]
        stored = await client.registry.get_propagation(filtered["id"])
        assert (stored.filter, stored.transform) == (
            "type = 'invoice.paid' AND data.total > 100",
            "{id: data.id}",
        )
        for bad in ({"filter": "((("}, {"transform": "[[["}):
            doc = {"mode": "unidirectional", "source": "other", "targets": ["crm"], **bad}
            status, _, problem = await http.call("POST", "/v1/propagations", doc)
            assert status == 422 and problem["type"] == "urn:mesh:problem:validation", problem
        status, _, _ = await http.call("PATCH", "/v1/targets/crm", {"transform": "data"})
        assert status == 200 and (await client.registry.get_target("crm")).transform == "data"
        assert (await http.call("PATCH", "/v1/targets/crm", {"transform": "[[["}))[0] == 422
        status, _, _ = await http.call("PATCH", "/v1/targets/crm", {"transform": None})
        assert (await client.registry.get_target("crm")).transform is None
        status, _, props = await http.call("GET", "/v1/propagations")
        assert {p["id"] for p in props} == set(made.values())
        assert await client.registry.routes_for("bi") == [("shop", None), ("alerts", None)]
        status, _, gone = await http.call("DELETE", f"/v1/propagations/{made['broadcast']}")
        assert status == 200 and gone["removed"] == made["broadcast"]
        assert (await http.call("DELETE", f"/v1/propagations/{made['broadcast']}"))[0] == 404

        status, _, removed = await http.call("DELETE", "/v1/targets/bi")
        assert status == 200 and removed["removed"] == "bi"
        assert (await http.call("GET", "/v1/targets/bi"))[0] == 404

        # every change is in the audit log, by this key, without the secret
        async def audited() -> list[str]:
            store = await api.store()  # the API's read-side connection to the sink's database
            rows = await store.query_audit(limit=200)
            return [r.action for r in rows if r.actor == f"apikey:{admin_id}"]

        expected = {
            "target.create",
            "target.update",
            "target.pause",
            "target.resume",
            "target.rotate_secret",
            "propagation.create",
            "propagation.delete",
            "target.delete",
        }
        actions = await eventually(
            lambda: audited_if(audited, expected), what="audit rows from the API"
        )
        assert actions.count("propagation.create") == 5
        async with await open_store(settings.db_url) as store:
            rows = await store.query_audit(limit=200)
        dump = json.dumps([[r.before, r.after] for r in rows])
        assert secret not in dump and rotated["secret"] not in dump and admin not in dump
    logs = "".join(capfd.readouterr())
    assert "service started" in logs  # the logs were captured
    for text in (secret, rotated["secret"], admin, admin.rsplit("_", 1)[1]):
        assert text not in logs


async def audited_if(read: object, expected: set[str]) -> list[str] | None:
    actions: list[str] = await read()  # type: ignore[operator]
    return actions if expected <= set(actions) else None


async def test_bridge_tokens_and_status(
    api: Api, client: MeshClient, settings: Settings, capfd: pytest.CaptureFixture[str]
) -> None:
    _, admin = await make_key(client, "admin")
    _, read = await make_key(client, "read")
    async with Http(api.url, admin) as http:
        await http.call("POST", "/v1/targets", {"name": "feed", "kind": "stream"})
        status, _, issued = await http.call(
            "POST", "/v1/tokens", {"target": "feed", "ttl_s": 600, "publish_as": ["feed", "x"]}
        )
        assert status == 201, issued
        claims = verify(load_key(key_path(settings)), issued["token"], "feed")
        assert claims.jti == issued["jti"] and claims.publish_as == ("feed", "x")

        status, _, rev = await http.call(
            "POST", f"/v1/tokens/{claims.jti}/revoke", {"reason": "lost"}
        )
        assert status == 200 and rev["new"] is True
        store = await RevocationStore.open(client.port, client.names.revoked)
        assert await store.refusal(claims) is not None
        # a body whose fields all have defaults may be left out
        status, _, again = await http.call("POST", f"/v1/tokens/{claims.jti}/revoke")
        assert again["new"] is False
        status, _, all_rev = await http.call("POST", "/v1/targets/feed/revoke-tokens")
        assert status == 200 and all_rev["revocation"]["kind"] == "target"
        status, _, listed = await http.call("GET", "/v1/tokens/revoked", key=read)
        assert status == 200 and {r["id"] for r in listed} == {claims.jti, "feed"}
        assert issued["token"] not in json.dumps(listed)

        # status: 503 problem without a health service, the health document with one
        status, _, problem = await http.call("GET", "/v1/status", key=read)
        assert status == 503 and problem["type"] == "urn:mesh:problem:unavailable"
        health = Health(settings.model_copy(update={"http_port": 0}))
        async with running(health):
            status, _, doc = await http.call("GET", "/v1/status", key=read)
            assert status == 200
            assert set(doc) == set(health.status())
            assert [t["name"] for t in doc["targets"]] == ["feed"]
    logs = "".join(capfd.readouterr())
    assert "service started" in logs
    assert issued["token"] not in logs and admin not in logs and read not in logs


async def test_an_audit_record_that_cannot_be_stored_is_an_error(settings: Settings) -> None:
    from mesh.errors import BrokerError
    from services.api.audit import Auditor

    # a prefix with no streams: no JetStream stream takes mesh.sys.audit.* there
    async with MeshClient(settings.model_copy(update={"prefix": "nostreams"})) as bare:
        with pytest.raises(
            BrokerError, match=r"target\.create of target:x was made, but its audit"
        ):
            await Auditor(bare).record("apikey:0123456789ab", "target.create", "target:x")
