"""Helpers shared by the command modules: settings, a connected client, data parsing, output."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from mesh.cli._tables import Col, render
from mesh.client import MeshClient
from mesh.config import Settings, load_settings
from mesh.errors import ValidationError
from mesh.serverinfo import warn_without_services

T = TypeVar("T")

# soft_wrap: long lines (ids, URLs) stay whole when piped instead of breaking at 80 columns.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
# One-line messages are never wrapped at the terminal width (they get grepped and pasted).
say = functools.partial(console.print, soft_wrap=True, highlight=False)
note = functools.partial(err_console.print, soft_wrap=True, highlight=False)


# `mesh --quiet` (or MESH_QUIET=1): no warning when no mesh service is running.
QUIET = False


def settings() -> Settings:
    return load_settings()


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@asynccontextmanager
async def connected(s: Settings | None = None, name: str = "mesh-cli") -> AsyncIterator[MeshClient]:
    """A client for one command: fail fast when the broker is not there."""
    s = s or settings()
    s = s.model_copy(update={"connect_timeout": min(s.connect_timeout, 3.0)})
    client = MeshClient(s, name=name, reconnect_forever=False)
    await client.connect()
    if not (s.quiet or QUIET):
        await warn_without_services(
            client.port, s.prefix, lambda line: note(f"mesh: warning: {line}")
        )
    try:
        yield client
    finally:
        await client.close()


def parse_data(raw: str | None) -> Any:
    """``--data``: JSON text, ``@file`` (JSON) or ``-`` (JSON on stdin). None -> None."""
    if raw is None:
        return None
    where = "--data"
    if raw == "-":
        raw = sys.stdin.read()
        where = "stdin"
    elif raw.startswith("@"):
        path = Path(raw[1:])
        try:
            raw = path.read_text()
        except OSError as exc:
            raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValidationError(f"{path} is not UTF-8 text") from None
        where = str(path)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"malformed JSON in {where}: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w``."""
    text = text.strip()
    if len(text) >= 2 and text[-1] in UNITS:
        try:
            n = float(text[:-1])
        except ValueError:
            n = -1
        if n > 0:
            return timedelta(seconds=n * UNITS[text[-1]])
    raise ValidationError(f"invalid duration {text!r}: use e.g. 30s, 15m, 2h, 7d")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A duration ago (``2h``) or an ISO 8601 time (naive means UTC)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if text and text[-1] in UNITS and text[:-1].replace(".", "", 1).isdigit():
        return now - parse_duration(text)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(
            f"invalid time {text!r}: use a duration ago (2h, 30m, 7d) or ISO 8601"
            " (2026-01-31T12:00:00Z)"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def print_table(title: str | None, columns: Sequence[Col | str], rows: list[list[Any]]) -> None:
    """A table fitted to the terminal (see ``mesh.cli._tables``); says on stderr when it
    left columns out or shortened ids."""
    plan = render(console, title, columns, rows)
    if len(plan.cols) < len(columns) and rows:
        dropped = [c if isinstance(c, str) else c.name for c in columns]
        for col in plan.cols:
            dropped.remove(col.name)
        narrow = [c for c in dropped if _has_content(rows, columns, c)]  # not just empty
        if narrow:
            note(f"(left out to fit {console.width} columns: {', '.join(narrow)}; --json has all)")
    if plan.cut_ids:
        note("(ids shortened to fit; --json has them whole)")


def _has_content(rows: list[list[Any]], columns: Sequence[Col | str], name: str) -> bool:
    names = [c if isinstance(c, str) else c.name for c in columns]
    i = names.index(name)
    return any(str(r[i] if r[i] is not None else "").strip() for r in rows)


def confirm(doing: str, question: str) -> None:
    """Ask ``question`` on a terminal (abort on no); elsewhere refuse: ``doing`` needs --yes."""
    if not sys.stdin.isatty():
        raise ValidationError(f"{doing} needs confirmation: pass --yes")
    if not typer.confirm(question, default=False):
        raise typer.Abort()
