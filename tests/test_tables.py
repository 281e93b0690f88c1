"""Every table of the CLI reads at 80 and 120 columns: the columns that fit, each with a
header and content, ids cut to a prefix only when they must be."""

from __future__ import annotations

import io
import uuid
from typing import Any

import pytest
from rich.console import Console

from mesh.cli._tables import Col, layout, render
from mesh.cli.bridge_cmds import REVOKED_COLUMNS
from mesh.cli.core import STATUS_COLUMNS
from mesh.cli.dlq_cmds import ENTRY_COLUMNS
from mesh.cli.keys_cmds import KEY_COLUMNS
from mesh.cli.registry_cmds import PROPAGATION_COLUMNS, TARGET_COLUMNS
from mesh.cli.replay_cmds import REPLAY_COLUMNS
from mesh.cli.storage_cmds import DELIVERY_COLUMNS, EVENT_COLUMNS
from tests.support.tables import table_problems, tables_in

EID = uuid.uuid4().hex
ERROR = "HTTP 501 Unsupported method ('POST') from http://127.0.0.1:8080/hook after 30.0 s"
WHEN = "2026-12-07 03:04:05"

# Rows as the commands build them, with the longest values a user meets.
TABLES: dict[str, tuple[list[Col], list[list[Any]]]] = {
    "dlq list": (
        ENTRY_COLUMNS,
        [[i, uuid.uuid4().hex, "crm", "shop order.created", 4, WHEN, ERROR] for i in (1, 12)],
    ),
    "events": (
        EVENT_COLUMNS,
        [[WHEN, EID, "shop", "order.created", 17, '{"order":1,"total":42,"lines":[1,2,3]}']],
    ),
    "deliveries": (
        DELIVERY_COLUMNS,
        [[WHEN, "crm", n, "retry", 501, "3.2", ERROR, uuid.uuid4().hex[:12]] for n in (1, 2)],
    ),
    "token list-revoked": (
        REVOKED_COLUMNS,
        [
            ["jti", uuid.uuid4().hex, "2026-12-07T03:04:05Z", "leaked in a CI log", "2027-12-08"],
            ["target", "screens", "2026-12-07T03:05:00Z", "", "2027-12-08"],
        ],
    ),
    "target list": (
        TARGET_COLUMNS,
        [
            ["billing", "nats", "", "active", "", "", 5, "30s"],
            [
                "crm",
                "webhook",
                "https://hooks.example.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXX",
                "disabled (HTTP 410 Gone from the receiver)",
                50,
                "yes",
                3,
                "10s",
            ],
        ],
    ),
    "propagation list": (
        PROPAGATION_COLUMNS,
        [
            [
                uuid.uuid4().hex[:12],
                "multicast",
                "shop -> billing, warehouse, audit",
                "order.*",
                "data.total >= 100 AND data.customer.tier IN ('gold', 'platinum')",
                "{id: order.id, total: total}",
            ],
            [uuid.uuid4().hex[:12], "broadcast", "ops -> every target", "*", "", ""],
        ],
    ),
    "keys status --usage": (
        KEY_COLUMNS,
        [
            [
                "k20261207030405-0a1b2c",
                "primary",
                "2026-12-07T03:04:05+00:00",
                "0.1",
                "events 1200, dead_letters 3, registry 4",
            ],
            ["k20260901000000-ffee00", "old (read only)", "2026-09-01T00:00:00+00:00", "97.1", "-"],
        ],
    ),
    "status": (STATUS_COLUMNS, [["crm", "webhook", "active", "open", 3, 1, 2]]),
    "replay --dry-run": (
        REPLAY_COLUMNS,
        [[1234, WHEN, "shop", "order.created", uuid.uuid4().hex]],
    ),
}


def printed(columns: list[Col], rows: list[list[Any]], width: int) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, soft_wrap=True)
    render(console, "title", columns, rows)
    return out.getvalue()


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("name", sorted(TABLES))
def test_each_table_fits(name: str, width: int) -> None:
    columns, rows = TABLES[name]
    text = printed(columns, rows, width)
    assert table_problems(text, width) == [], text
    [(headers, shown)] = tables_in(text)
    assert len(shown) == len(rows)
    # What must stay stays (ids at least as a prefix).
    for col in columns:
        if col.keep == 0 and any(str(r[columns.index(col)]) for r in rows):
            assert col.name in headers, (col.name, text)
    for col in columns:
        if col.ident and col.name in headers:
            i, j = columns.index(col), headers.index(col.name)
            for full, row in zip(rows, shown, strict=True):
                assert str(full[i]).startswith(row[j]), (row[j], full[i])
                assert len(row[j]) >= min(8, len(str(full[i]))), (row[j], full[i])


def test_wider_shows_more() -> None:
    for name, (columns, rows) in TABLES.items():
        cells = [[("" if v is None else str(v)) for v in r] for r in rows]
        narrow, wide = layout(columns, cells, 80), layout(columns, cells, 120)
        assert len(wide.cols) >= len(narrow.cols), name
        assert sum(wide.widths) >= sum(narrow.widths), name
    # At 120 columns the dead letters keep every column; at 80 they drop the least useful.
    dlq_cols, dlq_rows = TABLES["dlq list"]
    cells = [[str(v) for v in r] for r in dlq_rows]
    assert [c.name for c in layout(dlq_cols, cells, 120).cols] == [c.name for c in dlq_cols]
    assert "attempts" not in [c.name for c in layout(dlq_cols, cells, 80).cols]


def test_empty_columns_and_short_tables() -> None:
    cols = [Col("name", keep=0), Col("url", flex=True), Col("rate")]
    text = printed(cols, [["billing", "", None]], 80)
    [(headers, rows)] = tables_in(text)
    assert headers == ["name"] and rows == [["billing"]]
    # A table that fits is printed whole, ids included.
    text = printed([Col("id", keep=0, ident=True), Col("mode")], [[EID, "unidirectional"]], 120)
    assert EID in text
