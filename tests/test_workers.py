"""``--workers``: egress processes sharing one target's backlog (services/workers.py)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import ConfigError
from services.runner import textfile_target
from services.workers import WORKER_ENV, broker_is_local, resolve_workers
from tests.conftest import env_for
from tests.support.receiver import Receiver, Reply, add_webhook


def test_resolve_workers() -> None:
    assert resolve_workers("auto", broker_local=True, cores=4) == 3
    assert resolve_workers("auto", broker_local=False, cores=4) == 4
    assert resolve_workers("auto", broker_local=True, cores=1) == 1
    assert resolve_workers("3", broker_local=True) == 3
    for bad in ("0", "-2", "many", ""):
        with pytest.raises(ConfigError, match="--workers"):
            resolve_workers(bad, broker_local=True)


def test_broker_is_local(tmp_path: Path) -> None:
    assert broker_is_local(Settings(home=tmp_path))  # embedded
    assert broker_is_local(Settings(home=tmp_path, nats_url="nats://127.0.0.1:4333"))
    assert not broker_is_local(Settings(home=tmp_path, nats_url="nats://nats.example:4222"))


def test_worker_textfiles_do_not_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(home=tmp_path, nats_url="nats://127.0.0.1:4333")
    first, labels0 = textfile_target(s, ["webhook-egress"], embedded=False)
    monkeypatch.setenv(WORKER_ENV, "1")
    second, labels1 = textfile_target(s, ["webhook-egress"], embedded=False)
    assert first.name == "mesh-webhook-egress.prom"
    assert second.name == "mesh-webhook-egress-w1.prom"
    assert labels0 == {"mesh_process": "webhook-egress"}
    assert labels1 == {"mesh_process": "webhook-egress", "mesh_worker": "1"}


def delivered(path: Path) -> float:
    text = path.read_text()
    found = re.findall(r'^mesh_deliveries_total\{[^}]*outcome="delivered"[^}]*\} (\S+)', text, re.M)
    return sum(float(v) for v in found)


@pytest.mark.slow
async def test_two_workers_share_one_backlog(settings: Settings, client: MeshClient) -> None:
    n = 400
    # A slow receiver and 2 in flight per process: one process alone needs ~10 s, so the
    # second one is up while most of the backlog is still queued.
    async with Receiver(default=Reply(delay=0.05)) as rx:
        await add_webhook(client, "hook", rx.url, max_in_flight=2)
        await client.publish_many(
            [client.build("shop", "order.created", {"i": i}) for i in range(n)]
        )
        mesh = Path(sys.executable).with_name("mesh")
        proc = await asyncio.create_subprocess_exec(
            str(mesh), "serve", "webhook-egress", "--workers", "2", env=env_for(settings)
        )
        try:
            await rx.wait_for(n, timeout=120, unique=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    ids = rx.ids()
    assert len(set(ids)) == n
    # Nothing failed or stalled past the ack wait, so at-least-once allows no repeats.
    assert len(ids) == n, f"{len(ids) - n} duplicate receipts"
    files = sorted(os.listdir(settings.metrics_dir))
    assert "mesh-webhook-egress.prom" in files and "mesh-webhook-egress-w1.prom" in files
    counts = [
        delivered(settings.metrics_dir / f)
        for f in ("mesh-webhook-egress.prom", "mesh-webhook-egress-w1.prom")
    ]
    assert all(c > 0 for c in counts), counts  # both processes delivered
    assert sum(counts) == n
