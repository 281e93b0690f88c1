"""The bridge settles a client's ack as the egress settles a delivery: the attempt's
record is stored first, then the event is acked. When the record cannot be stored, the
event is handed back and comes again (a duplicate for the client), never an
acknowledged delivery without its record. Real nats-server, real WebSocket client."""

# The bridge fixtures come from test_bridge; pyflakes sees the parameters as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import aiohttp

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.records import Outcome
from services.bridge.service import Bridge
from tests.support import eventually
from tests.support.receiver import delivery_records
from tests.test_bridge import (  # noqa: F401 (fixtures, used as parameters)
    bridge,
    connect,
    http,
    make_bridge,
    mesh,
    publish,
    recv_events,
    settled,
    token,
)


async def _records_stored(client: MeshClient, stored: bool) -> None:
    """Point the records stream away from delivery records (or back)."""
    info = await client.js.stream_info(client.names.sys)
    cfg = info.config
    subjects = [s for s in cfg.subjects or [] if s != client.subjects.delivery_all]
    cfg.subjects = [*subjects, client.subjects.delivery_all] if stored else subjects
    await client.js.update_stream(cfg)


async def test_an_ack_whose_record_cannot_be_stored_comes_again(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    ids = await publish(mesh, 3)
    ws = await connect(http, bridge, token(settings))
    first = await recv_events(ws, 3)
    assert [f["id"] for f in first] == ids

    await _records_stored(mesh, False)
    await ws.send_json({"ack": [f["seq"] for f in first]})
    again = await recv_events(ws, 3, timeout=15)  # handed back, not acked
    assert sorted(f["id"] for f in again) == sorted(ids)
    assert all(f["attempt"] >= 2 for f in again)

    await _records_stored(mesh, True)
    await ws.send_json({"ack": [f["seq"] for f in again]})
    await settled(mesh)  # acked now, with nothing pending

    async def recorded() -> bool:
        recs = await delivery_records(mesh, "screens")
        return {r.event_id for r in recs if r.outcome == Outcome.DELIVERED} == set(ids)

    await eventually(recorded, 10, "a DELIVERED record for each event")
    await ws.close()
