"""Bridge tokens carry the tenant (real broker, real bridge, real WebSocket).

A token of tenant A publishes A's sources (``~ta.<source>``: only A's targets can get
them) and opens no target of tenant B, even one with the name its token names.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mesh import tokens
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.tenants import TenantStore
from services.bridge.service import Bridge, BridgeOptions
from tests.support.feeds import collect, queued

OPTIONS = {"host": "127.0.0.1", "fetch_expires_s": 0.5, "close_timeout_s": 1.0}


@pytest.fixture
async def bridge(settings: Settings, client: MeshClient) -> AsyncIterator[Bridge]:
    tenants = await TenantStore.open(client.port, client.names.tenants)
    for t in ("ta", "tb"):
        await tenants.create(t)
        await client.add_target(Target(name=f"{t}-screen", kind=TargetKind.STREAM, tenant=t))
        await client.add_target(Target(name=f"{t}-billing", kind=TargetKind.NATS, tenant=t))
        await client.registry.add_propagation(
            PropagationMode.UNIDIRECTIONAL, "pos", [f"{t}-billing"], tenant=t
        )
    await client.provisioner.reconcile_all()
    b = Bridge(settings, options=BridgeOptions(**OPTIONS))  # type: ignore[arg-type]
    await b.start()
    yield b
    await b.stop()


def _token(settings: Settings, target: str, **kw: Any) -> str:
    return tokens.issue(tokens.load_key(tokens.key_path(settings)), target, **kw)


async def test_a_tenant_token_publishes_its_tenant_sources_and_opens_no_other_target(
    bridge: Bridge, settings: Settings, client: MeshClient
) -> None:
    key = tokens.load_key(tokens.key_path(settings))
    claims = tokens.verify(key, _token(settings, "x", tenant="ta"), "x")
    assert claims.tenant == "ta"
    assert tokens.verify(key, _token(settings, "x"), "x").tenant == "default"

    async with aiohttp.ClientSession() as http:
        tok = _token(settings, "ta-screen", publish_as=["pos"], tenant="ta")
        ws = await http.ws_connect(
            bridge.url,
            params={"target": "ta-screen"},
            headers={"Authorization": f"Bearer {tok}"},
        )
        await ws.send_json({"publish": {"type": "sale.done", "source": "pos", "ref": 1}})
        reply = json.loads((await ws.receive(timeout=10)).data)
        assert reply["published"]["duplicate"] is False, reply
        await ws.close()

        got = await collect(client, "ta-billing", 1)
        assert [e.source for e in got] == ["~ta.pos"]
        await asyncio.sleep(0.3)
        assert await queued(client, "tb-billing") == 0  # B's "pos" is another source

        # A token made for tenant A naming B's target (as after a delete and re-create
        # under the same name): refused as if the target did not exist.
        wrong = _token(settings, "tb-screen", tenant="ta")
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await http.ws_connect(
                bridge.url,
                params={"target": "tb-screen"},
                headers={"Authorization": f"Bearer {wrong}"},
            )
        assert exc.value.status == 404
