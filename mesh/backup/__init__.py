"""Backup, restore and migration of a whole mesh (issue #22).

One archive holds the JetStream streams and KV buckets (server snapshots, with
their consumers), the SQL tables (portable rows) and the key directory sealed by a
passphrase. ``create_backup`` writes one, ``verify_archive`` checks one, and
``restore_archive`` puts one into an empty home, database and broker, which may be
another kind (SQLite and one server to PostgreSQL and a cluster).
"""

from __future__ import annotations

from mesh.backup.archive import ArchiveError, list_archives, prune_archives
from mesh.backup.create import BackupResult, create_backup
from mesh.backup.restore import RestoreResult, Verified, restore_archive, verify_archive
from mesh.backup.seal import SealError, read_passphrase

__all__ = [
    "ArchiveError",
    "BackupResult",
    "RestoreResult",
    "SealError",
    "Verified",
    "create_backup",
    "list_archives",
    "prune_archives",
    "read_passphrase",
    "restore_archive",
    "verify_archive",
]
