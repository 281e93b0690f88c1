"""Key rotation: status, rotate, re-encrypt stored payloads, prune old keys.

Rotation puts a new primary key in front of the ring; the old keys stay for
reading, so nothing stored becomes unreadable. ``reencrypt`` (``mesh.reencrypt``) rewrites the
database's payload columns (and the registry's sealed webhook secrets) under the
primary key, batch by batch, recording its place in a checkpoint file next to
the key file so that an interrupted run resumes where it stopped.

Messages retained in JetStream cannot be rewritten: they keep their key until
they age out (or are purged). ``prune`` therefore removes an old key only when
no database row, no retained message in the events and dead-letter streams,
and no registry secret still needs it, and otherwise says which store holds
how many.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mesh import envelope
from mesh._nats.types import js_errors
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.crypto import Key, KeyRing
from mesh.errors import KeyFileError, StorageError
from mesh.registry import Target
from mesh.storage import Store, backend_of, open_store, sqlite_path

DEFAULT_BATCH = 500

#: Progress callback: (what, done, total).
Progress = Callable[[str, int, int], None]


def load_ring(settings: Settings) -> KeyRing:
    """The key ring as it is on disk now (never created here)."""
    return KeyRing.load(settings.key_path, create=False)


# Status -----------------------------------------------------------------------------


@dataclass
class KeyInfo:
    id: str
    created: datetime
    age_days: float
    primary: bool


@dataclass
class KeyStatus:
    file: Path
    keys: list[KeyInfo]
    rotation_days: int
    overdue: bool

    @property
    def primary(self) -> KeyInfo:
        return self.keys[0]

    @property
    def warning(self) -> str | None:
        if not self.overdue:
            return None
        return (
            f"primary key {self.primary.id} is {self.primary.age_days:.0f} days old, over the"
            f" rotation interval of {self.rotation_days} days: run `mesh keys rotate --reencrypt`"
        )

    def doc(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "rotation_days": self.rotation_days,
            "overdue": self.overdue,
            "warning": self.warning,
            "keys": [
                {
                    "id": k.id,
                    "created": k.created.isoformat(),
                    "age_days": round(k.age_days, 2),
                    "primary": k.primary,
                }
                for k in self.keys
            ],
        }


def key_status(settings: Settings, ring: KeyRing, now: datetime | None = None) -> KeyStatus:
    now = now or datetime.now(UTC)
    keys = [
        KeyInfo(
            id=k.id,
            created=k.created,
            age_days=(now - k.created).total_seconds() / 86400,
            primary=i == 0,
        )
        for i, k in enumerate(ring.keys)
    ]
    return KeyStatus(
        file=settings.key_path,
        keys=keys,
        rotation_days=settings.key_rotation_days,
        overdue=ring.primary_age_days(now) > settings.key_rotation_days,
    )


def rotate(settings: Settings) -> Key:
    """Add a new primary key to the ring on disk (re-read first: never lose a key)."""
    return load_ring(settings).rotate()


# The database -----------------------------------------------------------------------


async def open_database(settings: Settings) -> Store | None:
    """The store, or None when there is no database yet (nothing stored in it)."""
    url = settings.db_url
    if backend_of(url) == "sqlite":
        path = sqlite_path(url)
        if path != ":memory:" and not await asyncio.to_thread(Path(path).exists):
            return None
    store = await open_store(url)
    try:
        applied = await store.applied_migrations()
    except StorageError:
        applied = []
    if not applied:
        await store.close()
        return None
    return store


def payload_tables() -> list[str]:
    from mesh.storage.models import PAYLOAD_TABLES

    return sorted(t.value for t in PAYLOAD_TABLES)


# Usage: which key each stored token needs ---------------------------------------------


@dataclass
class KeyUsage:
    """Tokens per store per key id; ``None`` counts tokens no key in the ring opens."""

    counts: dict[str, dict[str | None, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, store: str, key_id: str | None, n: int = 1) -> None:
        per = self.counts.setdefault(store, {})
        per[key_id] = per.get(key_id, 0) + n

    def for_key(self, key_id: str) -> dict[str, int]:
        """Stores that still need ``key_id``, with how many tokens each."""
        return {s: per[key_id] for s, per in self.counts.items() if per.get(key_id)}

    def undecryptable(self) -> dict[str, int]:
        return {s: per[None] for s, per in self.counts.items() if per.get(None)}

    def doc(self) -> dict[str, Any]:
        return {
            "stores": {
                s: {("undecryptable" if k is None else k): n for k, n in per.items()}
                for s, per in self.counts.items()
            },
            "notes": self.notes,
        }


def _secret_tokens(target: Target) -> list[str]:
    """The sealed secrets a target still needs (an expired old secret is never read)."""
    out = [target.secret_enc] if target.secret_enc else []
    if (
        target.old_secret_enc
        and target.old_secret_expires
        and target.old_secret_expires > datetime.now(UTC)
    ):
        out.append(target.old_secret_enc)
    return out


async def key_usage(
    settings: Settings,
    ring: KeyRing,
    client: MeshClient,
    progress: Progress | None = None,
) -> KeyUsage:
    """Scan every store that holds ciphertext and count tokens per key."""
    usage = KeyUsage()
    # The registry: webhook signing secrets.
    store_name = "registry secrets"
    usage.counts.setdefault(store_name, {})
    for t in await client.registry.list_targets():
        for token in _secret_tokens(t):
            usage.add(store_name, ring.key_id_for(token.encode()))
    # Retained messages: immutable, they keep their key until they age out.
    for stream, filters in (
        (client.names.events, [client.subjects.evt_all, client.subjects.replay_all]),
        (client.names.dlq, [client.subjects.dlq_all]),
    ):
        store_name = f"stream {stream}"
        try:
            await client.port.stream_info(stream)
        except js_errors.NotFoundError:
            usage.notes.append(f"no stream {stream}: nothing retained there")
            continue
        usage.counts.setdefault(store_name, {})
        total = 0

        def set_total(n: int, name: str = store_name) -> None:
            nonlocal total
            total = n
            if progress:
                progress(name, 0, n)

        done = 0
        async for msg in client.port.scan(stream, filters, on_total=set_total):
            done += 1
            headers = msg.headers or {}
            if headers.get(envelope.H_ENCRYPTION):
                usage.add(store_name, ring.key_id_for(msg.data))
            if progress and done % 256 == 0:
                progress(store_name, done, total)
        if progress:
            progress(store_name, done, max(done, total))
    # The database.
    store = await open_database(settings)
    if store is None:
        usage.notes.append(f"no database at {settings.db_url}: nothing stored there")
        return usage
    try:
        for table in payload_tables():
            store_name = f"database table {table}"
            usage.counts.setdefault(store_name, {})
            total = await store.count(table)
            done = 0
            if progress:
                progress(store_name, 0, total)
            async for _id, payload in store.iter_payloads(table, None, DEFAULT_BATCH):
                usage.add(store_name, ring.key_id_for(payload))
                done += 1
                if progress and done % 256 == 0:
                    progress(store_name, done, total)
            if progress:
                progress(store_name, done, max(done, total))
    finally:
        await store.close()
    return usage


# Prune --------------------------------------------------------------------------------


@dataclass
class KeyPruneResult:
    removed: list[str] = field(default_factory=list)
    refused: dict[str, dict[str, int]] = field(default_factory=dict)

    def hint(self) -> str:
        """What the operator can do about the stores that hold the keys back."""
        held = {s for stores in self.refused.values() for s in stores}
        out = []
        if any(s.startswith(("database", "registry")) for s in held):
            out.append("`mesh keys reencrypt` rewrites database rows and registry secrets")
        if any(s.startswith("stream") and not s.endswith("_DLQ") for s in held):
            out.append("retained events keep their key until they age out of the stream")
        if any(s.endswith("_DLQ") for s in held):
            out.append("dead letters leave with `mesh dlq replay` or `mesh dlq purge`")
        return "; ".join(out)

    def reasons(self) -> list[str]:
        out = []
        for key_id, stores in self.refused.items():
            held = ", ".join(f"{n} in {s}" for s, n in stores.items())
            out.append(f"key {key_id} is still needed: {held}")
        return out


def prune_candidates(ring: KeyRing, key_ids: list[str] | None) -> list[str]:
    """The keys asked for (default: every old key), checked against the ring."""
    if not key_ids:
        return [k.id for k in ring.keys[1:]]
    known = {k.id for k in ring.keys}
    for key_id in key_ids:
        if key_id not in known:
            raise KeyFileError(f"no key {key_id!r} in the ring (see `mesh keys status`)")
        if key_id == ring.primary.id:
            raise KeyFileError(f"key {key_id} is the primary key: it cannot be pruned")
    return list(dict.fromkeys(key_ids))


def plan_prune(usage: KeyUsage, candidates: list[str]) -> KeyPruneResult:
    plan = KeyPruneResult()
    for key_id in candidates:
        needed = usage.for_key(key_id)
        if needed:
            plan.refused[key_id] = needed
        else:
            plan.removed.append(key_id)
    return plan


def apply_prune(settings: Settings, plan: KeyPruneResult) -> list[str]:
    """Remove the keys the plan cleared from the ring on disk (re-read first)."""
    ring = load_ring(settings)
    removed = []
    for key_id in plan.removed:
        if key_id == ring.primary.id:
            raise KeyFileError(f"key {key_id} became the primary key meanwhile: not pruned")
        try:
            ring.remove(key_id)
        except KeyFileError:
            continue  # gone already
        removed.append(key_id)
    return removed


async def prune(
    settings: Settings,
    client: MeshClient,
    key_ids: list[str] | None = None,
    *,
    progress: Progress | None = None,
) -> KeyPruneResult:
    """Check every store, then remove the old keys nothing needs any more."""
    ring = load_ring(settings)
    candidates = prune_candidates(ring, key_ids)
    if not candidates:
        return KeyPruneResult()
    usage = await key_usage(settings, ring, client, progress)
    plan = plan_prune(usage, candidates)
    plan.removed = apply_prune(settings, plan)
    return plan


__all__ = [
    "KeyInfo",
    "KeyPruneResult",
    "KeyStatus",
    "KeyUsage",
    "apply_prune",
    "key_status",
    "key_usage",
    "load_ring",
    "open_database",
    "plan_prune",
    "prune",
    "prune_candidates",
    "rotate",
]
