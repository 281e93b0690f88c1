"""The sink stores each event's tenant (schema v4 adds the columns, default 'default'),
on SQLite and PostgreSQL (real broker, real sink service, real databases)."""

from __future__ import annotations

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.storage import open_store
from mesh.tenants import TenantStore
from services.sink import Sink
from tests.support import eventually, running


async def test_the_sink_writes_the_tenant_of_each_event(
    settings: Settings, client: MeshClient, db_url: str
) -> None:
    await (await TenantStore.open(client.port, client.names.tenants)).create("ta")
    s = settings.model_copy(update={"db_url": db_url})
    async with MeshClient(s.model_copy(update={"tenant": "ta"}), name="ta") as ta:
        a_id = await ta.publish("shop", "order.created", {"n": 1})
    d_id = await client.publish("shop", "order.created", {"n": 2})
    async with running(Sink(s, fetch_wait=0.2)), await open_store(db_url) as store:

        async def both() -> bool:
            return None not in (await store.get_event(a_id), await store.get_event(d_id))

        await eventually(both, what="both events in the sink")
        a_row, d_row = await store.get_event(a_id), await store.get_event(d_id)
        assert a_row is not None and d_row is not None
        assert (a_row.tenant, a_row.source) == ("ta", "~ta.shop")
        assert (d_row.tenant, d_row.source) == ("default", "shop")
        assert await store.applied_migrations() == [1, 2, 3, 4, 5]
