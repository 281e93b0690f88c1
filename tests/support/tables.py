"""Reading rich's tables back: every shown column has a header and some content, and no
line is wider than the terminal."""

from __future__ import annotations

BOX = set("┏┃┡│└")


def tables_in(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """``(headers, rows)`` of each table in ``text`` (rich's default heavy-head box)."""
    out: list[tuple[list[str], list[list[str]]]] = []
    headers: list[str] | None = None
    rows: list[list[str]] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("┃") and s.endswith("┃"):
            headers = [c.strip() for c in s.strip("┃").split("┃")]
            rows = []
        elif headers is not None and s.startswith("│") and s.endswith("│"):
            rows.append([c.strip() for c in s.strip("│").split("│")])
        elif headers is not None and s.startswith("└"):
            out.append((headers, rows))
            headers = None
    return out


def table_problems(text: str, width: int) -> list[str]:
    """What is wrong with the tables in ``text`` as printed at ``width`` columns."""
    # Tables only: one-line messages and events stay whole on purpose (they get grepped).
    boxed = [line for line in text.splitlines() if line.strip()[:1] in BOX]
    problems = [f"table line wider than {width}: {line!r}" for line in boxed if len(line) > width]
    for headers, rows in tables_in(text):
        for i, h in enumerate(headers):
            if not h:
                problems.append(f"empty header in column {i} of {headers}")
            if any(len(r) != len(headers) for r in rows):
                problems.append(f"ragged rows under {headers}")
                break
            if rows and not any(r[i] for r in rows):
                problems.append(f"column {h!r} has no content in {headers}")
    return problems
