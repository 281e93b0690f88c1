"""``mesh trace EVENT_ID``: what happened to one event, as a tree, from what the sink
stored (the event, and every delivery attempt with the trace id the event carried), for
users without a tracing back end::

    event 9b15df51... shop order.created at 2026-12-07T03:40:30+00:00  trace 1d844ea7...
    ta  delivered after 1 attempt
    └── #1  delivered  HTTP 200  3.1 ms  03:40:30
    tc  delivered after 3 attempts
    ├── #1  retry  HTTP 503  2.0 ms  03:40:30  HTTP 503 Service Unavailable
    ...
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.tree import Tree

from mesh.cli._common import arun, console, print_json, settings
from mesh.cli.storage_cmds import _query
from mesh.errors import NotFound
from mesh.history import delivery_doc
from mesh.storage import DeliveryRow, EventRow, Store

__all__ = ["register", "trace"]


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)


def trace(
    event_id: str = typer.Argument(..., help="The event id (see `mesh events`)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The tree of what happened to one event: each target, each attempt, the trace id."""
    s = settings()

    async def run(store: Store) -> tuple[EventRow | None, list[DeliveryRow]]:
        return await store.get_event(event_id), await store.query_deliveries(event_id)

    event, attempts = arun(_query(s, run))
    if event is None and not attempts:
        raise NotFound(f"no event {event_id!r} in the database (see `mesh events`)")
    doc = trace_doc(event_id, event, attempts)
    if as_json:
        print_json(doc)
        return
    head, trees = render(doc)
    console.print(head)  # soft-wrapped: the ids stay whole, greppable
    for tree in trees:
        console.print(tree)


def trace_doc(event_id: str, event: EventRow | None, attempts: list[DeliveryRow]) -> dict[str, Any]:
    """The tree as data: the event, its trace ids, and per target its attempts in order."""
    targets: dict[str, list[DeliveryRow]] = {}
    for row in sorted(attempts, key=lambda d: (d.at, d.attempt)):
        targets.setdefault(row.target, []).append(row)
    return {
        "event": {
            "id": event_id,
            "source": None if event is None else event.source,
            "type": None if event is None else event.type,
            "time": None if event is None else event.time.isoformat(),
            "stored": event is not None,
        },
        "trace_ids": sorted({d.trace_id for d in attempts if d.trace_id}),
        "targets": [
            {
                "target": name,
                "final": rows[-1].outcome,
                "attempts": [delivery_doc(d) for d in rows],
            }
            for name, rows in targets.items()
        ],
    }


def render(doc: dict[str, Any]) -> tuple[str, list[Tree]]:
    """The event's line, and one tree per target."""
    ev = doc["event"]
    head = f"[bold]event {escape(ev['id'])}[/]"
    if ev["stored"]:
        head += f" {escape(ev['source'])} {escape(ev['type'])} at {escape(ev['time'])}"
    else:
        head += " (not in the events table)"
    if doc["trace_ids"]:
        head += "  trace " + ", ".join(doc["trace_ids"])
    if not doc["targets"]:
        head += "\nno delivery attempts recorded"
    trees: list[Tree] = []
    for t in doc["targets"]:
        n = len([a for a in t["attempts"] if a["attempt"]])
        branch = Tree(
            f"[bold]{escape(t['target'])}[/]  {escape(t['final'])}"
            + (f" after {n} attempt{'s' if n != 1 else ''}" if n else "")
        )
        trees.append(branch)
        for a in t["attempts"]:
            parts = [f"#{a['attempt']}", a["outcome"]]
            if a["status_code"] is not None:
                parts.append(f"HTTP {a['status_code']}")
            if a["latency_ms"] is not None:
                parts.append(f"{a['latency_ms']:.1f} ms")
            parts.append(a["at"][11:19])
            if a["error"]:
                parts.append(a["error"][:120])
            branch.add(escape("  ".join(str(p) for p in parts)))
    return head, trees
