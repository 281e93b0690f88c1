"""A restore of a stream of many s2 blocks where the broker fsyncs every write.

nats-server gives up on a restore chunk after 5 s, and with ``sync_interval:
always`` one chunk's answer waits for a whole ~1 MiB block of messages stored with
an fsync each (mesh/backup/jetstream.py). ``mesh restore`` into an embedded home
restores through a temporary server at the default sync interval, whose clean stop
writes everything down; then the home's own broker (sync always, as ``mesh up``
runs it) has every message. A restore straight onto a sync-always server either
finishes or fails with one line naming the cause, and then leaves no stream behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mesh.backup import create_backup, restore_archive
from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.durability import SyncMode
from mesh.errors import BrokerError

pytestmark = pytest.mark.slow

PASSPHRASE = b"correct horse battery staple"
PAD = "x" * 200  # ~250 B of data, as the benches send
N_EVENTS = 20_000  # ~12 MiB of messages: a dozen s2 blocks of the snapshot


async def stream_counts(broker_url: str, settings: Settings) -> dict[str, int]:
    s = settings.model_copy(update={"nats_url": broker_url})
    async with MeshClient(s, name="test-count") as c:
        return {
            si.config.name: si.state.messages for si in await c.js.streams_info() if si.config.name
        }


@pytest.mark.timeout(600)
async def test_a_large_stream_restores_into_a_sync_always_home(tmp_path: Path) -> None:
    src = Settings(home=tmp_path / "src", nats_port=free_port(), http_port=0)
    # The source's sync mode is not the point (the restore's is): lazy fills it fast.
    broker = EmbeddedBroker(src.nats_store_dir, port=src.nats_port, sync=SyncMode.LAZY)
    await broker.astart()
    try:
        async with MeshClient(src, name="test") as c:
            await c.init()
            for start in range(0, N_EVENTS, 2_000):
                await c.publish_many(
                    [
                        c.build("shop", "order.placed", {"n": i, "pad": PAD})
                        for i in range(start, start + 2_000)
                    ]
                )
        made = await create_backup(src, tmp_path / "out", PASSPHRASE)
    finally:
        await broker.astop()
    assert made.manifest["streams"]["MESH_EVENTS"]["messages"] == N_EVENTS
    stream_bytes = made.manifest["streams"]["MESH_EVENTS"]["bytes"]
    assert stream_bytes > 8 * 1024 * 1024, stream_bytes  # many ~1 MiB s2 blocks, not one

    home = Settings(home=tmp_path / "home", nats_port=free_port(), http_port=0)
    assert home.broker_sync == SyncMode.ALWAYS.value
    result = await restore_archive(home, made.path, PASSPHRASE)
    assert result.streams["MESH_EVENTS"] == N_EVENTS
    # The home's own broker, as mesh up starts it (fsync every write): all of it is there.
    again = EmbeddedBroker(home.nats_store_dir, port=home.nats_port, sync=SyncMode.ALWAYS)
    await again.astart()
    try:
        counts = await stream_counts(again.url, home)
    finally:
        await again.astop()
    assert counts["MESH_EVENTS"] == N_EVENTS

    # Straight onto a server that fsyncs every write (MESH_NATS_URL): done, or one line
    # naming the cause and no stream left behind.
    direct = EmbeddedBroker(tmp_path / "direct", port=free_port(), sync=SyncMode.ALWAYS)
    await direct.astart()
    try:
        target = Settings(home=tmp_path / "direct-home", nats_url=direct.url, http_port=0)
        try:
            done = await restore_archive(target, made.path, PASSPHRASE)
        except BrokerError as exc:
            line = str(exc)
            assert "\n" not in line
            assert "sync_interval: always" in line, line
            assert await stream_counts(direct.url, target) == {}
            print(f"\ndirect restore onto a sync-always server failed as expected: {line}")
        else:
            assert done.streams["MESH_EVENTS"] == N_EVENTS
            print("\ndirect restore onto a sync-always server finished (a fast disk)")
    finally:
        await direct.astop()
        shutil.rmtree(tmp_path / "direct", ignore_errors=True)
    print(json.dumps({"stream_bytes": stream_bytes, "restore_s": round(result.seconds, 1)}))
