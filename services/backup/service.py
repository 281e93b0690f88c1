"""The backup service: ``mesh backup create`` every MESH_BACKUP_EVERY, keeping the newest
MESH_BACKUP_KEEP archives in MESH_BACKUP_DIR.

The archives are sealed to the home's backup key (mesh/backup/recipient.py), so the
service needs no passphrase once a key is made (`mesh backup key`); given one
(MESH_BACKUP_PASSPHRASE_FILE) it checks or makes the key on its first round. Either is
checked at start, so a service that could never write a sealed archive fails at once
instead of at the first round. A failed round
is logged and counted, and the next one comes on schedule; nothing is retried in a loop.
Several instances would each take backups: run one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, ClassVar

from prometheus_client import Counter, Gauge

from mesh.backup import read_passphrase
from mesh.backup import recipient as backup_key
from mesh.backup.create import prepare_key
from mesh.backup.recipient import Recipient
from mesh.backup.schedule import backup_round, parse_every
from mesh.config import Settings
from mesh.errors import ConfigError, MeshError
from mesh.observability import METRICS
from services.base import Service

LAST_SUCCESS = Gauge(
    "mesh_backup_last_success_timestamp_seconds",
    "When the last scheduled backup finished (Unix time)",
    registry=METRICS.registry,
)
LAST_SIZE = Gauge(
    "mesh_backup_last_size_bytes", "Size of the last backup archive", registry=METRICS.registry
)
LAST_DURATION = Gauge(
    "mesh_backup_last_duration_seconds", "How long the last backup took", registry=METRICS.registry
)
FAILURES = Counter(
    "mesh_backup_failures", "Scheduled backups that failed", registry=METRICS.registry
)


class Backup(Service):
    name: ClassVar[str] = "backup"

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        if not settings.backup_every:
            raise ConfigError("the backup service needs MESH_BACKUP_EVERY (e.g. 1h)")
        self.every_s = parse_every(settings.backup_every)
        self.passphrase: bytes | None = None
        if settings.backup_passphrase_file is not None:
            self.passphrase = read_passphrase(settings.backup_passphrase_file)
        elif backup_key.load(settings.home) is None:
            raise ConfigError(
                "the backup service needs a backup key: run `mesh backup key"
                " --passphrase-file F` once, or set MESH_BACKUP_PASSPHRASE_FILE"
            )
        self._key: Recipient | None = None  # prepared once, on the first round
        self.last: dict[str, Any] = {}
        self.rounds = 0  # successful ones
        self._wake = asyncio.Event()

    async def on_start(self) -> None:
        self.settings.backups_dir.mkdir(parents=True, exist_ok=True)
        self.spawn(self._loop(), name="backup-loop")

    async def on_drain(self, timeout: float) -> None:
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {"every_s": self.every_s, "keep": self.settings.backup_keep, **self.last}

    async def _loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.every_s)
            if self.stopping.is_set():
                return
            await self.round()

    async def round(self) -> None:
        started = time.monotonic()
        try:
            if self._key is None:
                self._key = await asyncio.to_thread(prepare_key, self.settings, self.passphrase)
            result, removed = await backup_round(self.settings, recipient=self._key)
        except (MeshError, OSError) as exc:
            FAILURES.inc()
            self.last = {"last_error": str(exc)}
            self.log.error("backup failed", error=str(exc))
            return
        self.rounds += 1
        LAST_SUCCESS.set(time.time())
        LAST_SIZE.set(result.size)
        LAST_DURATION.set(time.monotonic() - started)
        self.last = {"last_archive": result.path.name, "last_bytes": result.size}
        self.log.info(
            "backup written",
            archive=str(result.path),
            bytes=result.size,
            seconds=round(result.seconds, 2),
            removed=[p.name for p in removed],
        )


def main() -> None:
    """``python -m services.backup``: the backup service alone, on MESH_NATS_URL."""
    from mesh.config import load_settings
    from mesh.observability import configure_logging
    from services.runner import main_sync

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    if settings.embedded:
        settings = settings.model_copy(update={"nats_url": settings.servers[0]})
    try:
        main_sync(["backup"], settings)
    except MeshError as exc:
        raise SystemExit(f"mesh backup: error: {exc}") from None


__all__ = ["Backup", "main"]
