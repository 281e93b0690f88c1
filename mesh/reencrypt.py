"""Re-encryption after a key rotation: ``reencrypt`` rewrites the database's payload
columns (and the registry's sealed webhook secrets) under the primary key, batch by
batch, recording its place in a checkpoint file next to the key file so that an
interrupted run resumes where it stopped. Status, usage and pruning of keys are in
``mesh.keys``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh._nats.types import js_errors
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.crypto import KeyRing
from mesh.errors import ValidationError
from mesh.keys import DEFAULT_BATCH, Progress, open_database, payload_tables
from mesh.registry import Target
from mesh.storage import Store

CHECKPOINT_NAME = "reencrypt-progress.json"
KV_RETRIES = 5


@dataclass
class TableCount:
    rewritten: int = 0
    current: int = 0  # already under the primary key
    undecryptable: int = 0


@dataclass
class ReencryptResult:
    primary: str
    tables: dict[str, TableCount] = field(default_factory=dict)
    secrets_resealed: int = 0
    resumed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(t.rewritten for t in self.tables.values())

    @property
    def undecryptable(self) -> int:
        return sum(t.undecryptable for t in self.tables.values())

    def doc(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "resumed": self.resumed,
            "secrets_resealed": self.secrets_resealed,
            "tables": {
                name: {
                    "rewritten": t.rewritten,
                    "current": t.current,
                    "undecryptable": t.undecryptable,
                }
                for name, t in self.tables.items()
            },
            "notes": self.notes,
        }


class Checkpoint:
    """Where a re-encryption stopped: per primary key, tables done and the last id."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_settings(cls, settings: Settings) -> Checkpoint:
        return cls(settings.key_path.parent / CHECKPOINT_NAME)

    def load(self, primary: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a broken checkpoint only costs a full pass
        if not isinstance(doc, dict) or doc.get("primary") != primary:
            return {}  # made for another key: start over
        return doc

    def save(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _under_primary(ring: KeyRing, token: bytes) -> bool | None:
    """True under the primary, False under an older key, None under none of ours."""
    key_id = ring.key_id_for(token)
    if key_id is None:
        return None
    return key_id == ring.primary.id


async def reseal_secrets(ring: KeyRing, client: MeshClient) -> int:
    """Re-seal webhook secrets in the registry under the primary key; returns how many."""
    resealed = 0
    kv = client.registry.kv
    for t in await client.registry.list_targets():
        key = f"targets.{t.name}"
        for _ in range(KV_RETRIES):
            try:
                entry = await kv.get(key)
            except js_errors.KeyNotFoundError:
                break  # removed meanwhile
            if entry.value is None:
                break
            target = Target.model_validate_json(entry.value)
            changed = 0
            for attr in ("secret_enc", "old_secret_enc"):
                token = getattr(target, attr)
                if token and _under_primary(ring, token.encode()) is False:
                    setattr(target, attr, ring.reencrypt(token.encode()).decode())
                    changed += 1
            if not changed:
                break
            try:
                await kv.update(key, target.model_dump_json().encode(), last=entry.revision)
            except js_errors.KeyWrongLastSequenceError:
                continue  # changed under us: read it again
            resealed += changed
            break
    return resealed


async def reencrypt(
    settings: Settings,
    ring: KeyRing,
    client: MeshClient | None = None,
    *,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
    restart: bool = False,
) -> ReencryptResult:
    """Rewrite stored payloads (and registry secrets, given a client) under the primary key.

    Resumable: after each committed batch the last id is saved in a checkpoint
    next to the key file; a new run for the same primary key continues there
    (``restart`` ignores it). Rows already under the primary are left alone.
    """
    if batch_size < 1:
        raise ValidationError("--batch-size must be at least 1")
    primary = ring.primary.id
    result = ReencryptResult(primary=primary)
    if client is not None:
        result.secrets_resealed = await reseal_secrets(ring, client)
    else:
        result.notes.append("registry secrets not re-sealed: no broker connection")
    checkpoint = Checkpoint.for_settings(settings)
    state = {} if restart else checkpoint.load(primary)
    result.resumed = bool(state)
    store = await open_database(settings)
    if store is None:
        result.notes.append(f"no database at {settings.db_url}: no rows to rewrite")
        checkpoint.clear()
        return result
    done_tables: list[str] = list(state.get("done", []))
    try:
        for table in payload_tables():
            counts = result.tables.setdefault(table, TableCount())
            if table in done_tables:
                continue
            after = state.get("after_id") if state.get("table") == table else None
            total = await store.count(table)
            seen = 0
            if progress:
                progress(table, 0, total)
            batch: list[tuple[str, bytes]] = []
            last_id = after
            async for row_id, payload in store.iter_payloads(table, after, batch_size):
                seen += 1
                last_id = row_id
                where = _under_primary(ring, payload)
                if where is None:
                    counts.undecryptable += 1
                elif where:
                    counts.current += 1
                else:
                    batch.append((row_id, ring.reencrypt(payload)))
                if seen % batch_size == 0:
                    counts.rewritten += await _commit(store, table, batch)
                    batch = []
                    checkpoint.save(
                        {
                            "primary": primary,
                            "done": done_tables,
                            "table": table,
                            "after_id": last_id,
                        }
                    )
                    if progress:
                        progress(table, seen, max(total, seen))
            counts.rewritten += await _commit(store, table, batch)
            done_tables.append(table)
            checkpoint.save({"primary": primary, "done": done_tables})
            if progress:
                progress(table, seen, max(total, seen))
    finally:
        await store.close()
    checkpoint.clear()
    return result


async def _commit(store: Store, table: str, rows: list[tuple[str, bytes]]) -> int:
    if not rows:
        return 0
    return await store.update_payloads(table, rows)


__all__ = ["Checkpoint", "ReencryptResult", "TableCount", "reencrypt", "reseal_secrets"]
