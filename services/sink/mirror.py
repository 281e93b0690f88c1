"""The sink's registry mirror: the ``services`` and ``propagations`` tables follow the
registry bucket (a watch, and a full resync every minute or after a reconnect), each
change audited as done by ``registry``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from mesh.client import MeshClient
from mesh.errors import DecodeError, NotFound, StorageError, ValidationError
from mesh.storage import Store
from mesh.subjects import key_ref
from services.sink.rows import propagation_row, service_row

REGISTRY_RESYNC_S = 60.0
AUDIT_ACTOR = "registry"

# A registry key whose entry is gone or cannot be read is not mirrored.
_UNREADABLE = (NotFound, DecodeError, ValidationError, PydanticValidationError)


class RegistryMirror:
    """Keeps the registry tables of the sink's store in line with the registry."""

    def __init__(
        self,
        client: MeshClient,
        store: Callable[[], Store | None],
        *,
        db_ready: asyncio.Event,
        db_down: Callable[[BaseException], None],
        stopping: asyncio.Event,
        log: Any,
    ) -> None:
        self.client = client
        self.store = store  # the sink's current store: None while the database is down
        self.db_ready = db_ready
        self.db_down = db_down
        self.stopping = stopping
        self.log = log

    async def run(self) -> None:
        """Resync the registry now and then; follow its changes in between."""
        await self.db_ready.wait()
        while not self.stopping.is_set():
            seen_reconnects = self.client.reconnects
            deadline = time.monotonic() + REGISTRY_RESYNC_S
            watch = asyncio.create_task(self._follow())
            try:
                try:
                    await self.resync()
                except Exception as exc:  # NATS or database trouble: next round retries
                    self.log.warning("registry resync failed", error=str(exc) or repr(exc))
                # A watcher can go quiet across a server restart: start a new one then.
                while (
                    not self.stopping.is_set()
                    and not watch.done()
                    and time.monotonic() < deadline
                    and seen_reconnects == self.client.reconnects
                ):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), 1.0)
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watch
            if watch.done() and not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)

    async def resync(self) -> None:
        """Make the tables match the registry: upsert what is there, delete what is not."""
        if self.store() is None:
            return
        registry = self.client.registry
        targets, props = await registry.targets_and_propagations()
        store = self.store()
        if store is None:  # the database went away meanwhile: the next round does it
            return
        for t in targets:
            await store.upsert_service(service_row(t), actor=AUDIT_ACTOR)
        for p in props:
            await store.upsert_propagation(propagation_row(p), actor=AUDIT_ACTOR)
        names = {t.ref for t in targets}
        for s in await store.list_services():
            if s.name not in names:
                await store.delete_service(s.name, actor=AUDIT_ACTOR)
        ids = {p.id for p in props}
        for row in await store.list_propagations():
            if row.id not in ids:
                await store.delete_propagation(row.id, actor=AUDIT_ACTOR)

    async def _follow(self) -> None:
        registry = self.client.registry
        async for key in registry.watch():
            store = self.store()
            if store is None:
                continue
            kind, _, ident = key.partition(".")
            try:
                if kind == "targets":
                    ident = key_ref(key) or ident  # a tenant's target: ~tenant.name
                    try:
                        target = await registry.get_target(ident)
                    except _UNREADABLE:  # gone, or unreadable: not mirrored either
                        await store.delete_service(ident, actor=AUDIT_ACTOR)
                    else:
                        await store.upsert_service(service_row(target), actor=AUDIT_ACTOR)
                elif kind == "props":
                    try:
                        prop = await registry.get_propagation(ident)
                    except _UNREADABLE:
                        await store.delete_propagation(ident, actor=AUDIT_ACTOR)
                    else:
                        await store.upsert_propagation(propagation_row(prop), actor=AUDIT_ACTOR)
            except StorageError as exc:
                # The periodic resync catches up once the database is back.
                self.db_down(exc)
