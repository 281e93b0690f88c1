"""`mesh status` shows each webhook target's circuit as the egress sees it: closed, open,
half-open, or paused; not just `active`."""

from __future__ import annotations

import json
import time

from mesh.cli._circuits import circuit_label
from mesh.client import MeshClient
from mesh.config import Settings
from services.egress import WebhookEgress
from tests.conftest import add_nats_target, env_for
from tests.support import eventually, running
from tests.support.inproc import mesh_inproc
from tests.support.receiver import Receiver, Reply, add_webhook, fast_policy
from tests.support.tables import table_problems, tables_in


def test_labels() -> None:
    now = time.time()
    assert circuit_label(None, paused=False, now=now) == "closed"
    assert circuit_label({"state": "closed"}, paused=True, now=now) == "paused"
    assert circuit_label({"state": "open", "until": now + 30}, paused=True, now=now) == "open"
    # Past its period and resumed: the next egress to look sends the probe.
    assert circuit_label({"state": "open", "until": now - 1}, paused=False, now=now) == "half-open"
    assert circuit_label({"state": "half_open"}, paused=False, now=now) == "half-open"


async def test_an_open_circuit_shows_as_open(settings: Settings, client: MeshClient) -> None:
    env = env_for(settings)
    await add_nats_target(client, "billing")
    async with Receiver(default=Reply(503)) as rx:
        await add_webhook(
            client,
            "crm",
            rx.url,
            retry=fast_policy(max_retries=10),
            circuit_threshold=2,
            circuit_open_s=60.0,
        )
        before = json.loads((await mesh_inproc(env, "status", "--json")).stdout)
        assert {t["name"]: t["circuit"] for t in before["targets"]} == {
            "billing": None,
            "crm": "closed",
        }
        async with running(WebhookEgress(settings, fetch_expires_s=0.2)):
            await client.publish("shop", "order.created", {"n": 1})

            async def is_open() -> bool:
                p = await mesh_inproc(env, "status", "--json")
                circuits = {t["name"]: t["circuit"] for t in json.loads(p.stdout)["targets"]}
                return circuits["crm"] == "open"

            await eventually(is_open, timeout=30)
            human = await mesh_inproc(env, "status", width=80)
    assert human.returncode == 0, human.stderr
    assert table_problems(human.stdout, 80) == [], human.stdout
    [(headers, rows)] = tables_in(human.stdout)
    crm = dict(zip(headers, next(r for r in rows if r[0] == "crm"), strict=True))
    assert (crm["status"], crm["circuit"]) == ("active", "open")
    billing = dict(zip(headers, next(r for r in rows if r[0] == "billing"), strict=True))
    assert billing["circuit"] == "-"
