"""Security promises from the outside: key files, and no secret or payload in metrics or errors.

A key file that is readable by others, or corrupt, stops every command with one
line (nothing stored is touched). After real traffic through the egress to a
failing receiver, none of the places an operator reads (Prometheus metrics,
dead-letter headers, delivery-attempt records, CLI output) contains the
signing secret or a payload's text.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from prometheus_client import generate_latest

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.records import parse_dead_letter, read_records
from mesh.registry import RetryPolicy, Target, TargetKind
from tests.conftest import env_for
from tests.support.receiver import Receiver, Reply
from tests.test_cli import mesh, one_line_error

PAYLOAD_CANARY = "PAYLOAD-CANARY-7f3a1c"
SECRET = "whsec_" + "c2VjdXJpdHktY2FuYXJ5LXNlY3JldC0xMjM0NTY3OA=="


async def test_key_file_readable_by_others_is_refused(
    client: MeshClient, settings: Settings
) -> None:
    before = (await client.js.stream_info(client.names.events)).state.messages
    os.chmod(settings.key_path, 0o644)
    env = env_for(settings)
    p = await mesh(env, "publish", "--source", "shop", "--type", "a.b", "--data", "{}")
    line = one_line_error(p, "chmod 600")
    assert p.returncode == 1
    assert str(settings.key_path) in line
    assert (await client.js.stream_info(client.names.events)).state.messages == before
    os.chmod(settings.key_path, 0o600)  # and nothing was rewritten meanwhile
    assert json.loads(settings.key_path.read_text())["keys"]


@pytest.mark.parametrize("content", ["", "{not json", '{"keys": [{"id": "k", "key": "short"}]}'])
async def test_corrupt_key_file_is_one_line(
    client: MeshClient, settings: Settings, content: str
) -> None:
    settings.key_path.write_text(content)
    os.chmod(settings.key_path, 0o600)
    p = await mesh(env_for(settings), "publish", "--source", "shop", "--type", "a.b")
    one_line_error(p, "corrupt")
    assert p.returncode == 1
    assert settings.key_path.read_text() == content  # never overwritten by a "repair"


async def test_no_secret_or_payload_in_metrics_dead_letters_or_records(
    client: MeshClient, settings: Settings
) -> None:
    from services.egress.service import WebhookEgress

    async with Receiver(default=Reply(500, body=b"internal error")) as rx:
        await client.add_target(
            Target(
                name="crm",
                kind=TargetKind.WEBHOOK,
                url=rx.url,
                timeout_s=2,
                retry=RetryPolicy(base_s=0.05, max_delay_s=0.1, max_retries=2),
            ),
            SECRET,
        )
        await client.add_propagation("unidirectional", "shop", ["crm"])
        egress = WebhookEgress(settings)
        await egress.start()
        try:
            await client.publish("shop", "order.created", {"note": PAYLOAD_CANARY})
            deadline = time.monotonic() + 30
            while (await client.js.stream_info(client.names.dlq)).state.messages < 1:
                assert time.monotonic() < deadline, "never dead-lettered"
                await asyncio.sleep(0.1)
        finally:
            await egress.stop()
        # The receiver did get the payload (it is the payload's destination) ...
        assert PAYLOAD_CANARY in rx.requests[0].body.decode()

    # ... but nothing an operator reads carries it, or the secret.
    secret_core = SECRET.removeprefix("whsec_")
    texts = [generate_latest().decode()]
    sub = await client.js.pull_subscribe(
        client.subjects.dlq_all, durable=None, stream=client.names.dlq
    )
    for m in await sub.fetch(10, timeout=5):
        dl = parse_dead_letter(m.headers, m.data)
        texts.append(json.dumps(dict(m.headers or {})))
        texts.append(dl.error)
        assert PAYLOAD_CANARY.encode() not in m.data  # the body stays ciphertext
    sub = await client.js.pull_subscribe(
        client.subjects.delivery_all, durable=None, stream=client.names.sys
    )
    records = [r for m in await sub.fetch(50, timeout=5) for r in read_records(m.data)]
    assert records
    texts += [json.dumps(r.__dict__) for r in records]
    env = env_for(settings)
    for args in (
        ["dlq", "list"],
        ["dlq", "list", "--json"],
        ["target", "list", "--json"],
        ["status", "--json"],
    ):
        p = await mesh(env, *args)
        assert p.returncode == 0, p.stderr
        texts.append(p.stdout + p.stderr)
    for text in texts:
        assert PAYLOAD_CANARY not in text
        assert secret_core not in text
