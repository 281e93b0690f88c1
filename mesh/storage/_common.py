"""Helpers both backends share: migrations on disk, statement parameters, time and JSON
coercion, URL redaction."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mesh.errors import StorageError, ValidationError
from mesh.storage.models import PAYLOAD_TABLES, Table
from mesh.subjects import validate_pattern

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class RowsRefused(StorageError):
    """The database is reachable but refuses the rows themselves (a NOT NULL or
    encoding violation, a value it cannot store). Retrying the same rows cannot
    help, unlike every other ``StorageError``."""


class Params:
    """The bound values of one statement, each added where its placeholder goes."""

    def __init__(self, mark: Callable[[int], str]) -> None:
        self.values: list[Any] = []
        self._mark = mark

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return self._mark(len(self.values))


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(backend: str) -> list[Migration]:
    """The ``NNNN_name.sql`` files shipped in ``mesh/storage/migrations/<backend>``, in order."""
    root = resources.files("mesh.storage").joinpath("migrations").joinpath(backend)
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"two {backend} migrations numbered {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def to_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"naive datetime {value.isoformat()}: times must be timezone-aware")
    return value.astimezone(UTC)


def dump_json(value: Any) -> str:
    # Stable text, so an unchanged registry entry compares equal to what is stored.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def load_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def check_table(table: Table | str, *, payload: bool = False) -> Table:
    try:
        checked = Table(table)
    except ValueError:
        raise ValidationError(f"unknown table {table!r}") from None
    if payload and checked not in PAYLOAD_TABLES:
        raise ValidationError(f"table {checked.value!r} has no payload column")
    return checked


def check_limit(limit: int) -> int:
    if limit < 1:
        raise ValidationError(f"limit must be at least 1, not {limit}")
    return limit


def type_regex(pattern: str) -> str | None:
    """A regular expression for a type pattern with wildcards; ``None`` for a plain type."""
    validate_pattern(pattern)
    tokens = pattern.split(".")
    if "*" not in tokens and ">" not in tokens:
        return None
    parts = ["[^.]+" if t == "*" else ".+" if t == ">" else re.escape(t) for t in tokens]
    return "^" + r"\.".join(parts) + "$"


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text and text[0] else type(exc).__name__
