"""Paged history queries over ``events`` and ``deliveries``: filters and keyset cursors.

A page is ordered newest first by ``(time, id)`` for events and ``(at, id)`` for
delivery attempts. Its cursor is the key of its last row, so the next page starts
strictly after it: rows written meanwhile never shift a page or repeat a row, and
a page costs the same however deep it is (no ``OFFSET``). The cursor is opaque to
callers (url-safe base64 of ``[kind, time, id]``) and names the list it belongs to,
so one from the events list is refused by the deliveries list.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from mesh.errors import ValidationError
from mesh.storage._common import check_limit, to_utc, type_regex
from mesh.storage._rows import DELIVERIES, EVENTS, RowSpec
from mesh.storage.models import DeliveryRow, EventRow

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mesh.storage._common import Params

R = TypeVar("R")


class _Keyed(Protocol):
    @property
    def id(self) -> str: ...


K = TypeVar("K", bound=_Keyed)

#: The most rows one page may ask for.
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Page(Generic[R]):
    """Rows of one page and the cursor of the next (``None``: this was the last)."""

    items: list[R]
    next_cursor: str | None = None


def encode_cursor(kind: str, at: datetime, id: str) -> str:
    raw = json.dumps([kind, to_utc(at).isoformat(timespec="microseconds"), id])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> tuple[datetime, str]:
    """The ``(time, id)`` key in a cursor of list ``kind``; ``ValidationError`` if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got, at, id = json.loads(raw)
        when = datetime.fromisoformat(at)
        if got != kind or not isinstance(id, str) or when.tzinfo is None:
            raise ValueError(got)
    except (ValueError, TypeError, binascii.Error):
        raise ValidationError(f"invalid cursor for the {kind} list: {cursor[:80]!r}") from None
    return when, id


def _check_page(limit: int) -> int:
    if check_limit(limit) > MAX_PAGE:
        raise ValidationError(f"limit must be at most {MAX_PAGE}, not {limit}")
    return limit


def _empty_range(since: datetime | None, until: datetime | None) -> bool:
    return since is not None and until is not None and to_utc(until) <= to_utc(since)


def event_filters(
    p: Params, regexp: str, source: str | None, type: str | None, tenant: str | None = None
) -> list[str]:
    """Conditions for events from ``source`` of ``type`` (a type or a pattern), of
    ``tenant`` if given (None: every tenant's, for an operator)."""
    where: list[str] = [] if tenant is None else [f"tenant = {p(tenant)}"]
    if source is not None:
        where.append(f"source = {p(source)}")
    if type is not None:
        regex = type_regex(type)
        where.append(f"type = {p(type)}" if regex is None else f"type {regexp} {p(regex)}")
    return where


class HistoryQueries:
    """``list_events`` and ``list_deliveries`` for a SQL store (mixed into ``SqlStore``)."""

    _REGEXP: ClassVar[str]

    if TYPE_CHECKING:

        def _params(self) -> Params: ...
        def _ts(self, value: datetime) -> Any: ...
        def _dt(self, value: Any) -> datetime: ...
        async def _fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    async def list_events(
        self,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
    ) -> Page[EventRow]:
        p = self._params()
        where = event_filters(p, self._REGEXP, source, type, tenant)
        return await self._page(EVENTS, "events", "time", p, where, since, until, cursor, limit)

    async def list_deliveries(
        self,
        target: str | None = None,
        outcomes: Collection[str] | None = None,
        event_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        cursor: str | None = None,
        limit: int = 100,
        *,
        tenant: str | None = None,
    ) -> Page[DeliveryRow]:
        p = self._params()
        where: list[str] = [] if tenant is None else [f"tenant = {p(tenant)}"]
        if target is not None:
            where.append(f"target = {p(target)}")
        if event_id is not None:
            where.append(f"event_id = {p(event_id)}")
        if outcomes is not None:
            if not outcomes:
                return Page([])
            where.append(f"outcome IN ({', '.join(p(o) for o in sorted(outcomes))})")
        return await self._page(
            DELIVERIES, "deliveries", "at", p, where, since, until, cursor, limit
        )

    async def _page(
        self,
        spec: RowSpec[K],
        kind: str,
        column: str,
        p: Params,
        where: list[str],
        since: datetime | None,
        until: datetime | None,
        cursor: str | None,
        limit: int,
    ) -> Page[K]:
        """Rows of ``spec`` matching ``where`` and the range, newest first by ``(column, id)``."""
        _check_page(limit)
        after = None if cursor is None else decode_cursor(kind, cursor)
        if _empty_range(since, until):
            return Page([])
        if since is not None:
            where.append(f"{column} >= {p(self._ts(since))}")
        if until is not None:
            where.append(f"{column} < {p(self._ts(until))}")
        if after is not None:
            at, id = after
            # Row-value comparison: both SQLite (3.15+) and PostgreSQL walk the index.
            where.append(f"({column}, id) < ({p(self._ts(at))}, {p(id)})")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        # One row more than asked says whether a next page exists.
        rows = await self._fetch(
            f"SELECT {spec.columns} FROM {spec.table}{clause}"
            f" ORDER BY {column} DESC, id DESC LIMIT {p(limit + 1)}",
            *p.values,
        )
        items = [spec.decode(r, self._dt) for r in rows[:limit]]
        if len(rows) <= limit:
            return Page(items)
        last = items[-1]
        return Page(items, encode_cursor(kind, getattr(last, column), last.id))
