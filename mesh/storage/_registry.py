"""What counts as a change to a mirrored registry row, and the audit entry it makes."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from mesh.storage.models import PropagationRow, ServiceRow

RegistryRow = ServiceRow | PropagationRow
R = TypeVar("R", ServiceRow, PropagationRow)


def registry_json(row: RegistryRow) -> dict[str, Any]:
    """The row as audited and compared: timestamps are bookkeeping, left out."""
    data = dataclasses.asdict(row)
    for name in ("created_at", "updated_at"):
        data.pop(name, None)
    return data


def kind_of(row: RegistryRow) -> str:
    return "service" if isinstance(row, ServiceRow) else "propagation"


def key_of(row: RegistryRow) -> str:
    return row.name if isinstance(row, ServiceRow) else row.id


def changed(before: RegistryRow | None, after: RegistryRow) -> bool:
    # A re-sent registry snapshot with new times is no change.
    return before is None or registry_json(before) != registry_json(after)


def audit_upsert(before: RegistryRow | None, after: RegistryRow) -> tuple[str, str, Any, Any]:
    """``(action, entity, before, after)`` for an insert or update."""
    kind = kind_of(after)
    action = f"{kind}.{'create' if before is None else 'update'}"
    return (
        action,
        f"{kind}:{key_of(after)}",
        None if before is None else registry_json(before),
        registry_json(after),
    )


def audit_delete(before: RegistryRow) -> tuple[str, str, Any, Any]:
    kind = kind_of(before)
    return f"{kind}.delete", f"{kind}:{key_of(before)}", registry_json(before), None
