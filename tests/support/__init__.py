"""Helpers shared by test modules: polling, running services, scratch databases."""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from mesh.errors import BrokerError

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.storage import Store
    from services.base import Service

PG_DSN_VAR = "MESH_TEST_PG_DSN"
PG_SKIP_REASON = (
    f"PostgreSQL tests need {PG_DSN_VAR} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
)


async def eventually(
    check: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
) -> Any:
    """Poll ``check`` (plain or async) until it returns something truthy, and return that;
    fail naming ``what`` and the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


@asynccontextmanager
async def running(*services: Service) -> AsyncIterator[None]:
    """Start the services in order; stop those started, in reverse, on the way out."""
    started: list[Service] = []
    try:
        for svc in services:
            await svc.start()
            started.append(svc)
        yield
    finally:
        for svc in reversed(started):
            await svc.stop()


def remove_files(directory: Path, prefix: str) -> None:
    """Delete a SQLite database with its -wal and -shm files, as an operator might."""
    for path in directory.glob(prefix + "*"):
        path.unlink()


def env_pg_dsn() -> str | None:
    return os.environ.get(PG_DSN_VAR) or None


def with_search_path(dsn: str, schema: str) -> str:
    """The DSN with ``search_path`` set (asyncpg turns extra query parameters into settings)."""
    sep = "&" if urlsplit(dsn).query else "?"
    return f"{dsn}{sep}search_path={schema}"


def via(dsn: str, host: str, port: int) -> str:
    """The DSN pointed at another host and port (a proxy), credentials kept."""
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}{host}:{port}"))


def pg_target(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


@asynccontextmanager
async def pg_schema(dsn: str) -> AsyncIterator[str]:
    """A fresh schema for one test; yields the DSN that uses it, drops it afterwards."""
    import asyncpg

    schema = f"t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    try:
        yield with_search_path(dsn, schema)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


@asynccontextmanager
async def scratch_db(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database: a file under ``tmp_path``, or a scratch PG schema.

    PostgreSQL skips the test, with the reason, when ``MESH_TEST_PG_DSN`` is unset.
    """
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'mesh.db'}"
        return
    import pytest

    dsn = env_pg_dsn()
    if dsn is None:
        pytest.skip(PG_SKIP_REASON)
    async with pg_schema(dsn) as url:
        yield url


@asynccontextmanager
async def migrated_store(url: str) -> AsyncIterator[Store]:
    """An open store on ``url`` with the schema in place; closed on the way out."""
    from mesh.storage import open_store

    store = await open_store(url)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


async def migrate(url: str) -> None:
    """Put the schema in place in the database at ``url``."""
    async with migrated_store(url):
        pass


async def publish_reliably(
    client: MeshClient, event_id: str, data: Any, *, attempts: int = 200, timeout: float = 1.0
) -> str:
    """The publisher's side of never losing an event: retry with the same id until acked.

    A retry after a lost acknowledgement is stored once (the id is the dedupe key).
    """
    for _ in range(attempts):
        try:
            await client.publish("shop", "order.created", data, id=event_id, timeout=timeout)
            return event_id
        except BrokerError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"event {event_id} could not be published")
