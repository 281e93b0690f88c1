"""Cursor pages over the lists the registry answers whole (targets, propagations, tenants,
revoked tokens): ``GET ...?limit=N&cursor=C``.

The handler returns the whole list; the route (``Route.paged_by``) names the fields the
list is sorted by. A page is the rows after the cursor's key, at most ``limit`` of them;
when more follow, the ``Next-Cursor`` header (and ``Link: <...>; rel="next"``) carries the
cursor of the next page, url-safe base64 of ``[path, *key of the last row]``. The default
``limit`` is ``MAX_PAGE``, so a caller that pages nothing sees what it always saw. A
cursor of another list, or none the server made, is a 422.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, Field

from mesh.storage import MAX_PAGE
from services.api.problems import INVALID, ApiProblem, FieldError

NEXT_CURSOR = "Next-Cursor"


class ListQuery(BaseModel):
    cursor: str | None = Field(
        default=None, max_length=512, description="The Next-Cursor header of a page: the next"
    )
    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE, description="At most this many rows")


def _key(item: Any, fields: tuple[str, ...]) -> list[str]:
    get = item.get if isinstance(item, dict) else lambda f: getattr(item, f)
    return [str(get(f)) for f in fields]


def encode(path: str, key: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([path, *key]).encode()).decode().rstrip("=")


def decode(path: str, cursor: str, width: int) -> list[str]:
    try:
        doc = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(doc, list) or len(doc) != width + 1 or doc[0] != path:
            raise ValueError(cursor)
        if not all(isinstance(v, str) for v in doc[1:]):
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error):
        raise ApiProblem(
            INVALID,
            f"invalid cursor for {path}: {cursor[:80]!r}",
            errors=[
                FieldError(loc=["query", "cursor"], msg="not a cursor of this list", type="cursor")
            ],
        ) from None
    return list(doc[1:])


def page(
    path: str, fields: tuple[str, ...], query: ListQuery, rows: list[Any]
) -> tuple[list[Any], dict[str, str]]:
    """The page of ``rows`` the query asks for, and the headers that name the next one."""
    items = sorted(rows, key=lambda i: _key(i, fields))
    if query.cursor is not None:
        after = decode(path, query.cursor, len(fields))
        items = [i for i in items if _key(i, fields) > after]
    headers: dict[str, str] = {}
    if len(items) > query.limit:
        items = items[: query.limit]
        cursor = encode(path, _key(items[-1], fields))
        headers[NEXT_CURSOR] = cursor
        headers["Link"] = f'<{path}?limit={query.limit}&cursor={quote(cursor)}>; rel="next"'
    return items, headers
