"""Scheduled backups (``mesh serve backup``, or inside ``mesh up`` when
MESH_BACKUP_EVERY is set): ``service.py`` is the process; the work is mesh.backup."""

from services.backup.service import Backup

__all__ = ["Backup"]
