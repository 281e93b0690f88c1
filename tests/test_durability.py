"""Acknowledged means on disk (issue #14): the broker's sync mode, as configured and as shown.

The power-loss proof is tests/test_powerloss.py; this file checks the settings reach the
server and that `mesh up`, `mesh status` and /status say which mode runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import nats
import pytest

from mesh.broker import EmbeddedBroker, find_nats_server, free_port
from mesh.config import Settings, load_settings
from mesh.durability import LAZY_WARNING, SyncMode, broker_sync
from mesh.errors import ConfigError
from mesh.storage import Store, open_store
from mesh.storage.sqlite import SqliteStore
from tests.support import eventually, migrated_store
from tests.support.cli import MESH
from tests.support.inproc import mesh_inproc


def varz(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as resp:
        doc = json.loads(resp.read())
    config = doc["jetstream"]["config"]
    assert isinstance(config, dict)
    return config


@pytest.mark.parametrize(("mode", "sync_always"), [(SyncMode.ALWAYS, True), (SyncMode.LAZY, False)])
async def test_the_embedded_broker_runs_the_mode_it_is_given(
    tmp_path: Path, mode: SyncMode, sync_always: bool
) -> None:
    monitor = free_port()
    b = EmbeddedBroker(tmp_path / "nats", port=free_port(), http_port=monitor, sync=mode)
    with b:
        # omitted from /varz when false
        assert varz(monitor).get("sync_always", False) is sync_always
        nc = await nats.connect(b.url)
        try:
            shown = await broker_sync(nc, tmp_path / "nats")
        finally:
            await nc.close()
    assert shown == {"mode": str(mode), "source": "embedded broker config"}


def test_always_is_the_default_and_lazy_the_only_opt_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert EmbeddedBroker(tmp_path).sync is SyncMode.ALWAYS
    assert Settings().broker_sync == "always"
    monkeypatch.setenv("MESH_BROKER_SYNC", "lazy")
    assert Settings().broker_sync == "lazy"
    monkeypatch.setenv("MESH_BROKER_SYNC", "sometimes")
    with pytest.raises(ConfigError, match="MESH_BROKER_SYNC"):
        load_settings()


async def test_an_external_server_is_read_through_the_system_account(tmp_path: Path) -> None:
    """With system-account access the mode comes from the server, not from our records."""
    port, conf = free_port(), tmp_path / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}", sync_interval: always }}\n'
        "accounts {\n"
        "  SYS { users: [{user: sys, password: sys}] }\n"
        "  APP { jetstream: enabled, users: [{user: app, password: app}] }\n"
        "}\n"
        "system_account: SYS\n"
    )
    proc = await asyncio.create_subprocess_exec(find_nats_server(), "-c", str(conf))
    try:
        sys_nc = await eventually(
            lambda: _connect(f"nats://sys:sys@127.0.0.1:{port}"), what="nats-server up"
        )
        app_nc = await nats.connect(f"nats://app:app@127.0.0.1:{port}")
        try:
            via_sys = await broker_sync(sys_nc, tmp_path / "none")
            via_app = await broker_sync(app_nc, tmp_path / "none")
        finally:
            await sys_nc.close()
            await app_nc.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    assert via_sys["mode"] == "always" and via_sys["source"] == "server (/varz)"
    assert list(via_sys["servers"].values()) == ["always"]
    # Without system access nothing is known, and the answer says so.
    assert via_app["mode"] == "unknown" and "sync_interval" in via_app["source"]


async def _connect(url: str) -> nats.NATS | None:
    try:
        return await nats.connect(url, connect_timeout=0.5, max_reconnect_attempts=0)
    except Exception:
        return None


@pytest.mark.slow
async def test_mesh_up_lazy_warns_and_status_says_lazy(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_HOME": str(tmp_path / "uphome"),
            "MESH_NATS_PORT": str(free_port()),
            "MESH_HTTP_PORT": str(free_port()),
            "MESH_CONFIG": str(tmp_path / "no-mesh.toml"),
            "MESH_BROKER_SYNC": "lazy",
        }
    )
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *MESH, "up", "--services", "health", env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:

        async def status() -> dict[str, object] | None:
            if proc.returncode is not None:
                raise AssertionError(f"mesh up exited: {log.read_text()}")
            p = await mesh_inproc(env, "status", "--json")  # `mesh up` is the process here
            return json.loads(p.stdout) if p.returncode == 0 else None

        st = await eventually(status, timeout=60, interval=0.5, what="mesh status")
        assert st["broker"]["sync"] == {"mode": "lazy", "source": "embedded broker config"}  # type: ignore[index]

        async def health_status() -> dict[str, object] | None:
            url = f"http://127.0.0.1:{env['MESH_HTTP_PORT']}/status"
            try:
                body = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(url, timeout=2).read()
                )
            except OSError:
                return None
            return json.loads(body)  # type: ignore[no-any-return]

        doc = await eventually(health_status, timeout=30, interval=0.5, what="/status")
        assert doc["broker"]["sync"]["mode"] == "lazy"  # type: ignore[index]
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert LAZY_WARNING in log.read_text()


# --- the sink's database ----------------------------------------------------------------


async def test_the_stores_commit_durably(store: Store) -> None:
    """SQLite runs WAL + synchronous=FULL; PostgreSQL runs synchronous_commit on (default)."""
    assert await store.durability_warnings() == []


async def test_sqlite_below_full_is_reported(tmp_path: Path) -> None:
    async with migrated_store(f"sqlite:///{tmp_path / 'm.db'}") as store:
        assert isinstance(store, SqliteStore)
        assert store._writer is not None
        await store._writer.execute("PRAGMA synchronous=NORMAL")
        (warning,) = await store.durability_warnings()
    assert "synchronous is 1, not FULL" in warning


@pytest.mark.postgres
async def test_postgres_synchronous_commit_off_is_reported(pg_dsn: str) -> None:
    # asyncpg turns extra query parameters into session settings.
    sep = "&" if "?" in pg_dsn else "?"
    store = await open_store(f"{pg_dsn}{sep}synchronous_commit=off")
    try:
        (warning,) = await store.durability_warnings()
    finally:
        await store.close()
    assert "synchronous_commit is off" in warning
