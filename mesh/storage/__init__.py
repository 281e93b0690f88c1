"""Persistence for the sink: a ``Store`` protocol and its SQLite and PostgreSQL backends.

::

    store = await open_store("sqlite:///.mesh/mesh.db")   # or postgresql://user@host/db
    await store.migrate()
    await store.write_batch(events=[...], deliveries=[...])
    await store.close()

URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
``sqlite:///:memory:``; ``postgresql://`` (or ``postgres://``) DSNs as asyncpg
takes them, where extra query parameters such as ``?search_path=s`` become
server settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mesh.errors import StorageError
from mesh.storage._common import RowsRefused, redact_url
from mesh.storage._history import MAX_PAGE, Page
from mesh.storage.base import Store
from mesh.storage.models import (
    AuditRow,
    DeadLetterRow,
    DeliveryRow,
    EventRow,
    HealthCheckRow,
    PropagationRow,
    PruneResult,
    ServiceRow,
    Table,
    WriteResult,
)
from mesh.storage.scoped import TenantView, scoped

__all__ = [
    "MAX_PAGE",
    "AuditRow",
    "DeadLetterRow",
    "DeliveryRow",
    "EventRow",
    "HealthCheckRow",
    "Page",
    "PropagationRow",
    "PruneResult",
    "RowsRefused",
    "ServiceRow",
    "Store",
    "Table",
    "TenantView",
    "WriteResult",
    "backend_of",
    "open_store",
    "scoped",
    "sqlite_path",
]


def sqlite_path(url: str) -> str:
    """The file path in a ``sqlite:///`` URL (``:memory:`` for an in-memory database)."""
    if not url.startswith("sqlite:///"):
        raise StorageError(
            f"invalid SQLite URL {redact_url(url)!r}: use sqlite:///relative/path.db"
            " or sqlite:////absolute/path.db"
        )
    path = unquote(url[len("sqlite:///") :].split("?", 1)[0])
    if not path:
        raise StorageError(f"invalid SQLite URL {url!r}: no file path")
    return path


def backend_of(url: str) -> str:
    """``"sqlite"`` or ``"postgres"`` for a database URL; ``StorageError`` if it is neither.

    Checks the URL without connecting, so a service can refuse a bad setting at
    once and still start (and retry) while a good database is merely down.
    """
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme == "sqlite":
        sqlite_path(url)
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    raise StorageError(
        f"unsupported database URL {redact_url(url)!r}: use sqlite:///PATH"
        " or postgresql://USER@HOST/DB"
    )


async def open_store(url: str, *, existing: bool = False, **options: Any) -> Store:
    """Connect to the database at ``url``; raise ``StorageError`` with one clear line if not.

    ``existing``: a SQLite file must be there already (and writable), not be created.

    ``options`` go to the backend: ``busy_timeout_ms`` for SQLite; ``pool_size``,
    ``connect_timeout`` and ``command_timeout`` for PostgreSQL. The schema is
    not touched: call ``migrate()``.
    """
    safe = redact_url(url)
    if backend_of(url) == "sqlite":
        from mesh.storage.sqlite import SqliteStore, check_file

        path = sqlite_path(url)
        if existing and path != ":memory:":
            check_file(Path(path))
        return await SqliteStore.open(path, safe, **options)
    from mesh.storage.postgres import PostgresStore

    return await PostgresStore.open(url, safe, **options)
