"""Audit records from the HTTP API (``<prefix>.sys.audit.>`` on ``MESH_SYS``) into ``audit_log``.

They arrive on the sink's ``sink-sys`` feed among the delivery records. Each is
appended with its record id as ``ref`` (a redelivered record adds nothing), then
acked; while the database is down the write is retried with the same backoff as
the sink's other writes, and nothing is acked. An undecodable record is dropped
with a warning (it can never become a row).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any, Protocol

from mesh._nats.types import Msg
from mesh.errors import DecodeError, StorageError
from mesh.records import AuditRecord
from mesh.resilience import DATABASE_BACKOFF
from mesh.storage import Store


class SinkLike(Protocol):
    """What the feed uses of the sink: its store and its database bookkeeping."""

    store: Store | None
    stopping: asyncio.Event
    log: Any

    async def _open_store(self) -> bool: ...

    def _db_up(self) -> None: ...

    def _db_down(self, exc: BaseException) -> None: ...


class AuditFeed:
    def __init__(self, sink: SinkLike, prefix: str) -> None:
        self.sink = sink
        self.prefix = prefix  # <prefix>.sys.audit.
        self.written = 0

    def split(self, msgs: list[Msg]) -> tuple[list[Msg], list[Msg]]:
        """(audit records, the rest)."""
        audits = [m for m in msgs if m.subject.startswith(self.prefix)]
        if not audits:
            return [], msgs
        return audits, [m for m in msgs if not m.subject.startswith(self.prefix)]

    async def handle(self, msgs: list[Msg]) -> bool:
        """Append and ack each record; False when stopping before all were written."""
        for msg in msgs:
            try:
                rec = AuditRecord.from_bytes(msg.data)
                at = datetime.fromisoformat(rec.at)
            except (DecodeError, ValueError, TypeError) as exc:
                self.sink.log.warning("undecodable audit record dropped", error=str(exc))
                with contextlib.suppress(Exception):
                    await msg.term()
                continue
            if not await self._append(rec, at):
                return False
            with contextlib.suppress(Exception):
                await msg.ack()
        return True

    async def _append(self, rec: AuditRecord, at: datetime) -> bool:
        sink = self.sink
        delay = DATABASE_BACKOFF.first_s
        while True:
            if sink.store is None:
                await sink._open_store()
            store = sink.store
            if store is not None:
                try:
                    row = await store.append_audit(
                        rec.actor, rec.action, rec.entity, rec.before, rec.after, ref=rec.id, at=at
                    )
                except StorageError as exc:
                    sink._db_down(exc)
                else:
                    sink._db_up()
                    self.written += row is not None
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sink.stopping.wait(), delay)
            if sink.stopping.is_set():
                return False
            delay = DATABASE_BACKOFF.next(delay)
