"""Shared fixtures: a real nats-server on a free port, settings in a temp home, a client,
an empty database of each backend and a store on it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import Target, TargetKind
from mesh.storage import Store
from tests.support import migrated_store, scratch_db, watchdog

PG_DSN_ENV = "MESH_TEST_PG_DSN"


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's MESH_* or OTEL_* settings or a mesh.toml in the cwd."""
    for key in list(os.environ):
        # MESH_TEST_* name the external servers of the tests (PostgreSQL, RabbitMQ...).
        if key.startswith(("MESH_", "OTEL_")) and not key.startswith("MESH_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MESH_CONFIG", str(tmp_path / "no-mesh.toml"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A hung test prints where its coroutines wait, shortly before pytest-timeout fires."""
    marker = item.get_closest_marker("timeout")
    limit = (
        float(marker.args[0])
        if marker and marker.args
        else float(item.config.getini("timeout") or 0)
    )
    timer = watchdog.start(max(limit - 5, 1)) if limit else None
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """A test that configures logging (a service, the CLI in-process) leaves no level
    filter or renderer behind for the next one."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A fresh nats-server with JetStream, its own port and store directory."""
    b = EmbeddedBroker(tmp_path / "nats", port=free_port(), log_file=tmp_path / "nats.log")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    home = tmp_path / "home"
    return Settings(
        home=home,
        nats_url=broker.url,
        allow_private_targets=True,
        http_port=free_port(),
        bridge_port=free_port(),
        api_port=free_port(),
    )


def env_for(settings: Settings) -> dict[str, str]:
    """Environment for a subprocess (CLI or service) pointed at the same mesh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_HOME": str(settings.home),
            "MESH_NATS_URL": settings.nats_url or "",
            "MESH_DB_URL": settings.db_url,
            "MESH_ALLOW_PRIVATE_TARGETS": "1" if settings.allow_private_targets else "0",
            "MESH_HTTP_PORT": str(settings.http_port),
            "MESH_BRIDGE_PORT": str(settings.bridge_port),
            "MESH_API_PORT": str(settings.api_port),
            "MESH_CONFIG": str(settings.home / "no-mesh.toml"),
            "MESH_LOG_FORMAT": "json",
            # Most tests run commands against a broker with no services: like a script,
            # they want no "no mesh services are running" warning (tests/test_preflight.py
            # checks it).
            "MESH_QUIET": "1",
        }
    )
    return env


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[MeshClient]:
    async with MeshClient(settings, name="test") as c:
        await c.init()
        yield c


@pytest.fixture
async def egress(settings: Settings, client: MeshClient) -> AsyncIterator[Any]:
    """A webhook egress in this process with short idle fetches (a stop waits for the one
    in progress)."""
    from services.egress.service import WebhookEgress

    svc = WebhookEgress(settings, fetch_expires_s=0.5)
    await svc.start()
    yield svc
    await svc.stop()


async def add_nats_target(client: MeshClient, name: str) -> Target:
    return await client.add_target(Target(name=name, kind=TargetKind.NATS))


@pytest.fixture
def pg_dsn() -> str:
    dsn = os.environ.get(PG_DSN_ENV)
    if not dsn:
        pytest.skip(
            f"PostgreSQL tests need {PG_DSN_ENV} (e.g. postgresql://postgres@127.0.0.1/test)"
        )
    return dsn


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of an empty database of each backend."""
    async with scratch_db(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """An open, migrated store on ``db_url``."""
    async with migrated_store(db_url) as s:
        yield s
