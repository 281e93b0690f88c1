"""The key file as the health service reports it: the primary key's age against the
rotation interval, or why the ring cannot be read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mesh.crypto import KeyRing
from mesh.errors import MeshError
from mesh.observability import scrub_text


def short_error(exc: BaseException) -> str:
    """The first line of an error, secrets masked, at most 300 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return scrub_text(text)[:300]


def key_doc(key_path: Path, rotation: int) -> dict[str, Any]:
    """``/status``'s ``keys``: the primary's id and age, and a warning past ``rotation``."""
    try:
        ring = KeyRing.load(key_path, create=False)
    except MeshError as exc:
        return {"ok": False, "error": short_error(exc), "rotation_days": rotation, "warning": None}
    primary = ring.primary
    age_days = (datetime.now(UTC) - primary.created).total_seconds() / 86400
    warning = None
    if age_days > rotation:
        warning = (
            f"the primary key is {age_days:.0f} days old, past the {rotation}-day"
            " rotation interval: run `mesh keys rotate`"
        )
    return {
        "ok": True,
        "primary_id": primary.id,
        "created": primary.created.isoformat(),
        "age_days": round(age_days, 2),
        "rotation_days": rotation,
        "keys": len(ring.keys),
        "warning": warning,
    }
