"""Tables that read at the terminal's width (80 columns included).

Each column says how it may give way when the table is too wide:

- ``keep``: 0 is never dropped; higher numbers are dropped first (ties: the rightmost);
- ``ident``: an id, shown whole when it fits, else cut to a prefix of at least
  ``ID_PREFIX`` characters (``--json`` has it whole; ``mesh dlq show`` takes the
  prefix, other commands the whole id);
- ``flex``: free text (data, errors, reasons), cut with an ellipsis, never below
  ``FLEX_MIN`` characters.

Other columns are shown whole or not at all, every cell on one line. A column with no
content in any row is left out, so no header stands over nothing, and no column is
narrower than its header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

ID_PREFIX = 8
FLEX_MIN = 12
# rich's default box: one space of padding each side of a cell, a rule between columns
# and at both ends.
PER_COLUMN = 3
EDGES = 1


@dataclass(frozen=True)
class Col:
    name: str
    keep: int = 1
    ident: bool = False
    flex: bool = False

    def floor(self, natural: int) -> int:
        """The narrowest this column may get."""
        head = len(self.name)
        if self.ident:
            return max(head, min(natural, ID_PREFIX))
        if self.flex:
            return max(head, min(natural, FLEX_MIN))
        return max(head, natural)


def guess(name: str) -> Col:
    """A column spec from its name, for tables that give plain names."""
    low = name.lower()
    if low == "key":  # key ids share their date prefix: shown whole
        return Col(name, keep=0)
    if low == "id" or low.endswith(" id"):
        return Col(name, keep=0, ident=True)
    if low in ("data", "last error", "error", "reason", "url", "route", "types", "still protects"):
        return Col(name, keep=1, flex=True)
    return Col(name, keep=1)


def _cell(v: Any) -> str:
    return "" if v is None else str(v)


@dataclass
class Layout:
    cols: list[Col]
    index: list[int]  # position of each shown column in the input
    widths: list[int]
    cut_ids: bool


def layout(cols: Sequence[Col], rows: Sequence[Sequence[str]], width: int) -> Layout:
    """Which columns to show and how wide, for a table ``width`` characters wide."""
    natural = [max([len(c.name), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    shown = [i for i in range(len(cols)) if any(r[i].strip() for r in rows) or not rows]

    def total(ix: list[int], w: dict[int, int]) -> int:
        return sum(w[i] for i in ix) + PER_COLUMN * len(ix) + EDGES

    floors = {i: cols[i].floor(natural[i]) for i in shown}
    while total(shown, floors) > width:
        droppable = [i for i in shown if cols[i].keep > 0]
        if not droppable:
            break
        worst = max(cols[i].keep for i in droppable)
        shown.remove([i for i in droppable if cols[i].keep == worst][-1])
    widths = {i: natural[i] for i in shown}
    excess = total(shown, widths) - width
    cut_ids = False
    # Give way: free text first (widest first), then ids.
    for kind in ("flex", "ident"):
        group = sorted(
            (i for i in shown if getattr(cols[i], kind)), key=lambda i: widths[i], reverse=True
        )
        for i in group:
            if excess <= 0:
                break
            give = min(excess, widths[i] - floors[i])
            if give > 0:
                widths[i] -= give
                excess -= give
                cut_ids = cut_ids or kind == "ident"
    return Layout([cols[i] for i in shown], shown, [widths[i] for i in shown], cut_ids)


def render(
    console: Console,
    title: str | None,
    columns: Sequence[Col | str],
    rows: Sequence[Sequence[Any]],
    width: int | None = None,
) -> Layout:
    """Print the table on ``console``, fitted to ``width`` (default: the console's)."""
    cols = [c if isinstance(c, Col) else guess(c) for c in columns]
    cells = [[_cell(v) for v in r] for r in rows]
    plan = layout(cols, cells, width or console.width)
    table = Table(title=title, header_style="bold")
    for col, w in zip(plan.cols, plan.widths, strict=True):
        table.add_column(
            col.name,
            width=w,
            min_width=w,
            no_wrap=True,
            overflow="ellipsis" if col.flex else "crop",
        )
    for r in cells:
        row = []
        for col, i, w in zip(plan.cols, plan.index, plan.widths, strict=True):
            text = r[i]
            if col.ident and len(text) > w:
                text = text[:w]  # a prefix, no ellipsis: it is what one types
            row.append(Text(text))
        table.add_row(*row)
    console.print(table, soft_wrap=False)
    return plan


__all__ = ["Col", "Layout", "guess", "layout", "render"]
