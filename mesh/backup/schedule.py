"""Scheduled backups: the period setting and one round (back up, then keep the newest N)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh.backup.archive import prune_archives
from mesh.backup.create import BackupResult, create_backup
from mesh.backup.recipient import Recipient
from mesh.config import Settings
from mesh.errors import ConfigError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_EVERY_S = 1.0


def parse_every(text: str) -> float:
    """``MESH_BACKUP_EVERY``: ``90s``, ``15m``, ``1h``, ``1d`` -> seconds."""
    text = text.strip()
    try:
        n = float(text[:-1]) * UNITS[text[-1]] if text else -1.0
    except (KeyError, ValueError):
        n = -1.0
    if n < MIN_EVERY_S:
        raise ConfigError(f"invalid MESH_BACKUP_EVERY {text!r}: use e.g. 30m, 1h, 1d")
    return n


async def backup_round(
    settings: Settings,
    passphrase: bytes | None = None,
    directory: Path | None = None,
    recipient: Recipient | None = None,
) -> tuple[BackupResult, list[Path]]:
    """One backup into the backup directory, then the oldest beyond MESH_BACKUP_KEEP go."""
    where = directory or settings.backups_dir
    result = await create_backup(settings, where, passphrase, recipient=recipient)
    removed = await asyncio.to_thread(prune_archives, where, settings.backup_keep)
    return result, removed
