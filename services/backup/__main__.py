"""``python -m services.backup``: scheduled backups alone (``services.backup.service.main``)."""

from services.backup.service import main

main()
