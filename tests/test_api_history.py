"""History, dead letters, replay and GraphQL over real HTTP, with a real sink, egress,
receiver and nats-server: what the API shows is what the services did."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from services.api import Api
from services.egress import WebhookEgress
from services.sink import Sink
from tests.support import eventually
from tests.support.api import Http, api_running, make_key
from tests.support.receiver import Receiver, Reply, add_webhook, dead_letters, fast_policy

PROBLEM = "application/problem+json"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
async def mesh(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    """The API with a sink and a webhook egress beside it."""
    sink = Sink(settings, batch_size=100, fetch_wait=0.2)
    egress = WebhookEgress(settings, fetch_expires_s=0.5)
    await sink.start()
    await egress.start()
    try:
        async with api_running(settings) as api:
            yield api
    finally:
        await egress.stop()
        await sink.stop()


@pytest.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def _attempts(http: Http, event_id: str, n: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status, _, doc = await http.call("GET", f"/v1/events/{event_id}")
        ok = status == 200 and doc["event"] is not None and len(doc["deliveries"]) >= n
        return doc if ok else None

    found: dict[str, Any] = await eventually(check, timeout=20, what=f"{n} attempts stored")
    return found


@pytest.mark.slow
async def test_events_attempts_pages_and_graphql(
    client: MeshClient, mesh: Api, rx: Receiver
) -> None:
    await add_webhook(client, "crm", rx.url)
    rx.script(Reply(500, body=b"database   down\n"))
    _, admin = await make_key(client, "admin")
    _, reader = await make_key(client, "read")
    async with Http(mesh.url, admin) as http:
        status, _, first = await http.call(
            "POST",
            "/v1/events",
            {"source": "shop", "type": "order.created", "data": {"n": 0}},
            headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
        )
        assert status == 202
        doc = await _attempts(http, first["id"], 2)
        assert doc["event"]["data"] == {"n": 0} and doc["event"]["source"] == "shop"
        fail, ok = doc["deliveries"]
        assert (fail["outcome"], fail["status_code"], fail["attempt"]) == ("retry", 500, 1)
        assert fail["response_excerpt"] == "database down"
        assert (ok["outcome"], ok["status_code"], ok["attempt"]) == ("delivered", 200, 2)
        assert ok["latency_ms"] is not None and ok["response_excerpt"] is None
        assert fail["trace_id"] == ok["trace_id"] == TRACE_ID  # the caller's trace

        status, _, batch = await http.call(
            "POST",
            "/v1/events:batch",
            {
                "events": [
                    {"source": "shop", "type": "order.paid", "data": {"n": i}} for i in range(5)
                ]
            },
        )
        assert status == 202
        await _attempts(http, batch["ids"][-1], 1)
        await eventually(lambda: len(rx.requests) >= 7, timeout=20, what="all delivered")

    async with Http(mesh.url, reader) as http:
        # Every event once across pages, newest first (the batch, then the first).
        seen: list[str] = []
        cursor: str | None = None
        while True:
            path = "/v1/events?source=shop&limit=2" + (f"&cursor={cursor}" if cursor else "")
            status, _, page = await http.call("GET", path)
            assert status == 200 and len(page["items"]) <= 2
            seen += [e["id"] for e in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted([first["id"], *batch["ids"]]) and len(seen) == 6
        assert seen[-1] == first["id"]

        status, _, paid = await http.call("GET", "/v1/events?type=order.paid&limit=100")
        assert {e["id"] for e in paid["items"]} == set(batch["ids"])

        status, _, failures = await http.call(
            "GET", "/v1/deliveries?target=crm&outcome=retry&outcome=dead"
        )
        assert status == 200
        assert [(d["event_id"], d["status_code"]) for d in failures["items"]] == [
            (first["id"], 500)
        ]

        query = """
          query($id: String!) {
            targets { name kind status propagations { mode source targets }
                      recentFailures(limit: 5) { eventId statusCode responseExcerpt } }
            event(id: $id) { type data deliveries { attempt outcome statusCode traceId } }
          }"""
        status, _, answer = await http.call(
            "POST", "/v1/graphql", {"query": query, "variables": {"id": first["id"]}}
        )
        assert status == 200 and "errors" not in answer, answer
        (crm,) = answer["data"]["targets"]
        assert (crm["name"], crm["kind"], crm["status"]) == ("crm", "webhook", "active")
        assert crm["propagations"] == [
            {"mode": "unidirectional", "source": "shop", "targets": ["crm"]}
        ]
        assert crm["recentFailures"] == [
            {"eventId": first["id"], "statusCode": 500, "responseExcerpt": "database down"}
        ]
        event = answer["data"]["event"]
        assert event["type"] == "order.created" and event["data"] == {"n": 0}
        assert [d["outcome"] for d in event["deliveries"]] == ["retry", "delivered"]
        assert {d["traceId"] for d in event["deliveries"]} == {TRACE_ID}

        # A read key reads; it changes nothing, not even through GraphQL.
        status, _, answer = await http.call(
            "POST", "/v1/graphql", {"query": 'mutation { x(id: "1") }'}
        )
        assert status == 200 and answer["data"] is None and answer["errors"]
        status, _, _ = await http.call("POST", "/v1/targets/crm/replay", {"since": _ago(60)})
        assert status == 403


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


@pytest.mark.slow
async def test_dead_letters_retry_purge_and_replay(
    client: MeshClient, mesh: Api, rx: Receiver
) -> None:
    await add_webhook(client, "erp", rx.url, retry=fast_policy(max_retries=0))
    rx.set_default(Reply(503))
    since = _ago(1)
    _, admin = await make_key(client, "admin")
    async with Http(mesh.url, admin) as http:
        ids = []
        for i in range(3):
            _, _, doc = await http.call(
                "POST", "/v1/events", {"source": "shop", "type": "invoice.sent", "data": {"n": i}}
            )
            ids.append(doc["id"])
            # Each dead before the next is published: erp is not ordered, so events out
            # at once may die in either order, and the listing is in the order they died.
            await eventually(
                lambda n=i + 1: _count_dead(client, n), timeout=20, what=f"{i + 1} dead letters"
            )

        status, _, listing = await http.call("GET", "/v1/dead-letters?target=erp")
        assert status == 200 and listing["unreadable"] == 0
        assert [d["event_id"] for d in listing["items"]] == ids
        assert all(
            d["target"] == "erp" and d["error"].startswith("HTTP 503") for d in listing["items"]
        )
        assert listing["next_cursor"] is None

        # Pages: a cursor carries on where the last page stopped, oldest first.
        status, _, first = await http.call("GET", "/v1/dead-letters?target=erp&limit=2")
        assert status == 200 and [d["event_id"] for d in first["items"]] == ids[:2]
        assert first["next_cursor"]
        status, _, second = await http.call(
            "GET", f"/v1/dead-letters?limit=2&cursor={first['next_cursor']}"
        )
        assert status == 200 and [d["event_id"] for d in second["items"]] == ids[2:]
        assert second["next_cursor"] is None
        both = f"cursor={first['next_cursor']}&since={quote(since)}"
        for bad in ("cursor=nope", both, "limit=0", "cursor=WyJldmVudHMiLDFd"):
            status, headers, problem = await http.call("GET", f"/v1/dead-letters?{bad}")
            assert status == 422 and headers["Content-Type"].startswith(PROBLEM), (bad, problem)

        rx.set_default(Reply(200))
        status, _, one = await http.call("POST", f"/v1/dead-letters/{ids[0]}/retry")
        assert status == 200 and one["replayed"] == 1 and one["failed"] == []
        await eventually(lambda: ids[0] in rx.ids(), timeout=20, what="retried delivery")

        status, _, some = await http.call("POST", "/v1/dead-letters:retry", {"ids": [ids[1]]})
        assert status == 200 and some["replayed"] == 1
        await eventually(lambda: ids[1] in rx.ids(), timeout=20, what="second retry")
        status, _, left = await http.call("GET", "/v1/dead-letters")
        assert [d["event_id"] for d in left["items"]] == [ids[2]]

        status, _, problem = await http.call("DELETE", "/v1/dead-letters")
        assert status == 422 and problem["errors"][0]["loc"] == ["query", "target"]
        status, _, purged = await http.call("DELETE", "/v1/dead-letters?target=erp")
        assert status == 200 and purged == {"purged": 1}
        status, _, _ = await http.call("GET", f"/v1/dead-letters/{ids[2]}")
        assert status == 404

        # Replay from a time: all three again, as replays, to erp only.
        status, _, dry = await http.call(
            "POST", "/v1/targets/erp/replay", {"since": since, "dry_run": True}
        )
        assert status == 200, dry
        assert dry["matched"] == 3 and dry["published"] == 0
        assert [s["id"] for s in dry["sample"]] == ids
        before = len(rx.requests)
        status, _, done = await http.call(
            "POST",
            "/v1/targets/erp/replay",
            {"from_seq": dry["sample"][1]["seq"], "to_seq": dry["sample"][2]["seq"]},
        )
        assert status == 200 and done["published"] == 2, done
        await eventually(lambda: len(rx.requests) >= before + 2, timeout=20, what="replayed")
        assert sorted(r.webhook_id for r in rx.requests[before:]) == sorted(ids[1:])

        for bad in (
            {},
            {"since": since, "from_seq": 1},
            {"since": "2024-01-01T00:00:00"},
            {"from_seq": 1, "until": since},
            {"since": since, "types": "a.>.b"},
        ):
            status, headers, problem = await http.call("POST", "/v1/targets/erp/replay", bad)
            assert status == 422 and headers["Content-Type"].startswith(PROBLEM), (bad, problem)
        for empty in (
            {"since": _ago(-3600)},
            {"since": since, "until": since},
            {"from_seq": 5, "to_seq": 4},
        ):
            status, _, problem = await http.call("POST", "/v1/targets/erp/replay", empty)
            assert status == 404 and "nothing to replay" in problem["detail"], (empty, problem)
        status, _, problem = await http.call("POST", "/v1/targets/nope/replay", {"since": since})
        assert status == 404 and "nope" in problem["detail"]


async def _count_dead(client: MeshClient, n: int) -> bool:
    return len(await dead_letters(client, "erp")) >= n


async def test_bad_input_and_keys_are_problems(client: MeshClient, mesh: Api) -> None:
    _, reader = await make_key(client, "read")
    _, publisher = await make_key(client, "publish")
    async with Http(mesh.url, reader) as http:
        for path in (
            "/v1/events?cursor=garbage",
            "/v1/events?limit=0",
            "/v1/events?limit=5000",
            "/v1/events?since=2024-01-01T00:00:00",
            "/v1/events?type=order.>.x",
        ):
            status, headers, problem = await http.call("GET", path)
            assert status == 422, (path, problem)
            assert headers["Content-Type"].startswith(PROBLEM)
            assert problem["type"] == "urn:mesh:problem:validation"
        for path in (
            "/v1/deliveries?since=2024-01-02T00:00:00Z&until=2024-01-01T00:00:00Z",
            "/v1/events?until=9999-12-31T23:00:00-05:00&since=0001-01-01T00:30:00%2B01:00",
        ):
            status, _, page = await http.call("GET", path)
            assert status == 200 and page == {"items": [], "next_cursor": None}, (path, page)
        status, _, problem = await http.call("GET", "/v1/events/nope")
        assert status == 404 and problem["type"] == "urn:mesh:problem:not-found"
        for ident in ("123", "99999999999999999999999", "no-such-letter"):
            status, _, problem = await http.call("GET", f"/v1/dead-letters/{ident}")
            assert status == 404, (ident, problem)

        status, _, answer = await http.call(
            "POST", "/v1/graphql", {"query": '{ events(after: "junk") { items { id } } }'}
        )
        assert status == 200 and answer["data"] == {"events": None}
        assert "invalid cursor" in answer["errors"][0]["message"]
        status, _, answer = await http.call("POST", "/v1/graphql", {"query": "{ nope }"})
        assert answer["errors"] and "nope" in answer["errors"][0]["message"]
        deep = (
            "{ deliveries { items { " + "event { deliveries { " * 4 + "id" + " } }" * 4 + " } } }"
        )
        status, _, answer = await http.call("POST", "/v1/graphql", {"query": deep})
        assert status == 200 and answer["data"] is None
        assert "depth" in answer["errors"][0]["message"]
        status, headers, problem = await http.call("POST", "/v1/graphql", data=b"{not json")
        assert status == 400 and headers["Content-Type"].startswith(PROBLEM)

        plain = {"query": "{ propagations { id } }"}
        status, _, answer = await http.call("GET", "/v1/graphql?query={propagations{id}}")
        assert status == 200 and answer == {"data": {"propagations": []}}
        async with Http(mesh.url) as anonymous:
            status, headers, _ = await anonymous.call("POST", "/v1/graphql", plain)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = await http.call("POST", "/v1/graphql", plain, key="mk_wrong")
        assert status == 401
        status, _, _ = await http.call("POST", "/v1/dead-letters:retry", {}, key=publisher)
        assert status == 403
        status, _, _ = await http.call("DELETE", "/v1/dead-letters?target=*")
        assert status == 403


def test_checked_in_graphql_schema_is_current() -> None:
    from pathlib import Path

    from services.api.graphql import sdl

    checked_in = Path(__file__).resolve().parent.parent / "docs" / "graphql.sdl"
    assert checked_in.read_text() == sdl() + "\n", (
        "docs/graphql.sdl is stale: regenerate with"
        ' `python -c "from services.api.graphql import sdl; print(sdl())" > docs/graphql.sdl`'
    )
    assert "type Mutation" not in checked_in.read_text()  # read-only
