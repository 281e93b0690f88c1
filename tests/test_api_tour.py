"""The README over HTTP: its curl examples run as written (real curl, a real key from
`mesh apikey create`), and its five-minute tour driven through the API only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from services.api import Api
from services.egress import WebhookEgress
from services.health import Health
from services.sink import Sink
from tests.conftest import env_for
from tests.support import eventually
from tests.support.api import Http, api_running, make_key
from tests.support.receiver import Receiver, Reply

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# What `python3 -m http.server` answers a POST with, as in the tour.
NOT_IMPLEMENTED = Reply(501, body=b"<html><body>Unsupported method ('POST')</body></html>")


@pytest.fixture
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver(default=NOT_IMPLEMENTED) as r:
        yield r


@pytest.fixture
async def mesh(settings: Settings, client: MeshClient) -> AsyncIterator[Api]:
    """What `mesh up` runs: the API, the sink, the webhook egress and the health service."""
    services = [
        Sink(settings, batch_size=100, fetch_wait=0.2),
        WebhookEgress(settings, fetch_expires_s=0.5),
        Health(settings),
    ]
    for svc in services:
        await svc.start()
    try:
        async with api_running(settings) as api:
            yield api
    finally:
        for svc in reversed(services):
            await svc.stop()


def readme_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    found = re.search(r"```sh\n(.*?)```", text[start:], re.DOTALL)
    assert found, f"no sh block after {heading!r}"
    return found.group(1)


# GETs that list nothing yet are retried for a while: the sink writes a moment after the
# publish, as the README says. Anything else runs once; a failing request fails the run.
CURL_SHIM = r"""
set -euo pipefail
curl() {
    local out
    case " $* " in
        *" -d "*) command curl --fail-with-body "$@"; echo; return ;;
    esac
    for _ in $(seq 1 60); do
        if out=$(command curl --fail-with-body "$@") \
            && [[ $out != *'"items":[]'* && $out != *'"deliveries":[]'* \
                  && $out != *'"recentFailures":[]'* ]]; then
            printf '%s\n' "$out"; return 0
        fi
        sleep 0.5
    done
    printf '%s\n' "$out"; return 1
}
"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's examples need curl")
async def test_readme_curl_examples_run_as_written(
    settings: Settings, mesh: Api, rx: Receiver
) -> None:
    block = readme_block("## The same over HTTP")
    assert "http://127.0.0.1:9402" in block and "127.0.0.1:8080" in block
    host = rx.url.split("//", 1)[1].split("/", 1)[0]
    script = block.replace("http://127.0.0.1:9402", mesh.url).replace("127.0.0.1:8080", host)
    env = env_for(settings)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", CURL_SHIM + script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    proc = await asyncio.to_thread(run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    created, propagation, published, detail, failures, graph = docs
    assert created["name"] == "orders" and created["secret"].startswith("whsec_")
    assert propagation["mode"] == "unidirectional" and propagation["targets"] == ["orders"]
    assert published == {"id": "order-3"}
    assert detail["event"]["data"] == {"order": 3}
    first = detail["deliveries"][0]
    assert (first["target"], first["status_code"], first["outcome"]) == ("orders", 501, "retry")
    assert "Unsupported method" in first["response_excerpt"]
    assert {d["event_id"] for d in failures["items"]} == {"order-3"}
    target = graph["data"]["target"]
    assert target["status"] == "active"
    assert target["propagations"] == [{"mode": "unidirectional", "source": "shop"}]
    assert target["recentFailures"][0]["statusCode"] == 501
    assert rx.requests and all(r.path == "/hook" for r in rx.requests)


async def _lags(http: Http) -> dict[str, int]:
    status, _, doc = await http.call("GET", "/v1/status")
    assert status == 200, doc
    return {t["name"]: t["lag"] for t in doc["targets"]}


async def test_five_minute_tour_through_the_api_only(
    client: MeshClient, mesh: Api, rx: Receiver
) -> None:
    _, key = await make_key(client, "admin")
    async with Http(mesh.url, key) as http:

        async def ok(method: str, path: str, body: Any = None, want: int = 200) -> Any:
            status, _, doc = await http.call(method, path, body)
            assert status == want, (method, path, status, doc)
            return doc

        async def publish(source: str, type_: str, data: Any) -> str:
            doc = await ok(
                "POST", "/v1/events", {"source": source, "type": type_, "data": data}, 202
            )
            return str(doc["id"])

        async def lags_become(expected: dict[str, int]) -> None:
            seen: dict[str, int] = {}

            async def check() -> bool:
                seen.update(await _lags(http))
                return all(seen.get(k) == v for k, v in expected.items())

            try:
                await eventually(check, timeout=20, what=f"lags {expected}")
            except AssertionError:
                raise AssertionError(f"lags {seen}, expected {expected}") from None

        # Unidirectional: shop -> billing (a NATS program; its lag is its queue).
        await ok("POST", "/v1/targets", {"name": "billing", "kind": "nats"}, 201)
        await ok(
            "POST",
            "/v1/propagations",
            {"mode": "unidirectional", "source": "shop", "targets": ["billing"]},
            201,
        )
        await publish("shop", "order.created", {"order": 1, "total": 42})
        await lags_become({"billing": 1})

        # Narrowed by type: only order.* reaches audit.
        await ok("POST", "/v1/targets", {"name": "audit", "kind": "nats"}, 201)
        await ok(
            "POST",
            "/v1/propagations",
            {"mode": "unidirectional", "source": "shop", "targets": ["audit"], "types": "order.*"},
            201,
        )
        await publish("shop", "order.paid", {"order": 1})
        await publish("shop", "user.created", {"user": 9})
        await lags_become({"audit": 1, "billing": 3})

        # Webhook: the receiver answers 501 like http.server; after the retries, a dead letter.
        await ok(
            "POST",
            "/v1/targets",
            {
                "name": "crm",
                "kind": "webhook",
                "url": rx.url,
                "retry": {"max_retries": 1, "base_s": 0.05, "max_delay_s": 0.1},
            },
            201,
        )
        await ok(
            "POST",
            "/v1/propagations",
            {"mode": "unidirectional", "source": "shop", "targets": ["crm"]},
            201,
        )
        crm_event = await publish("shop", "order.created", {"order": 2})

        async def dead() -> Any:
            doc = await ok("GET", "/v1/dead-letters?target=crm")
            return doc["items"]

        (letter,) = await eventually(dead, timeout=20, what="crm's dead letter")
        assert letter["event_id"] == crm_event and letter["error"].startswith("HTTP 501")
        detail = await eventually(
            lambda: _attempts(http, crm_event, 2), timeout=20, what="crm's attempts stored"
        )
        assert [d["outcome"] for d in detail["deliveries"]] == ["retry", "dead"]

        # Multicast: one event, billing and warehouse.
        await ok("POST", "/v1/targets", {"name": "warehouse", "kind": "nats"}, 201)
        await ok(
            "POST",
            "/v1/propagations",
            {"mode": "multicast", "source": "shop", "targets": ["billing", "warehouse"]},
            201,
        )
        await publish("shop", "order.shipped", {"order": 1})
        await lags_become({"warehouse": 1})

        # Broadcast: every target, including one added afterwards.
        await ok("POST", "/v1/propagations", {"mode": "broadcast", "source": "ops"}, 201)
        await ok("POST", "/v1/targets", {"name": "pager", "kind": "nats"}, 201)
        await publish("ops", "maintenance.start", {"at": "22:00"})
        # audit: order.paid, order.created, order.shipped (order.*), then the broadcast.
        await lags_become({"pager": 1, "warehouse": 2, "audit": 4, "billing": 6})

        # Bidirectional: both ways.
        await ok("POST", "/v1/targets", {"name": "inventory", "kind": "nats"}, 201)
        await ok(
            "POST",
            "/v1/propagations",
            {"mode": "bidirectional", "source": "billing", "targets": ["inventory"]},
            201,
        )
        await publish("billing", "stock.reserve", {"sku": "A1"})
        await lags_become({"inventory": 1})
        before = (await _lags(http))["billing"]
        await publish("inventory", "stock.reserved", {"sku": "A1"})
        await lags_become({"billing": before + 1})

        # WebSocket clients: a stream target and its tokens.
        await ok("POST", "/v1/targets", {"name": "screens", "kind": "stream"}, 201)
        token = await ok("POST", "/v1/tokens", {"target": "screens", "ttl_s": 7 * 86400}, 201)
        await ok("POST", f"/v1/tokens/{token['jti']}/revoke", {"reason": "leaked"})
        revoked = await ok("GET", "/v1/tokens/revoked")
        assert token["jti"] in json.dumps(revoked)

        # Replay and history: audit's window again, and what the sink stored.
        replayed = await ok("POST", "/v1/targets/audit/replay", {"since": "2000-01-01T00:00:00Z"})
        assert replayed["published"] >= 1
        listed = await ok("GET", "/v1/events?source=shop&limit=100")
        assert crm_event in {e["id"] for e in listed["items"]}
        listing = await ok("GET", "/v1/propagations")
        assert {p["mode"] for p in listing} == {
            "unidirectional",
            "multicast",
            "broadcast",
            "bidirectional",
        }


async def _attempts(http: Http, event_id: str, n: int) -> dict[str, Any] | None:
    status, _, doc = await http.call("GET", f"/v1/events/{event_id}")
    if status == 200 and len(doc["deliveries"]) >= n:
        return dict(doc)
    return None
