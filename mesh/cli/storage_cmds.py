"""What the sink stored: ``mesh events``, ``mesh deliveries --event ID`` and
``mesh events prune``.

Payloads are ciphertext in the database; ``mesh.history`` decrypts them for
display only, with the key ring. Without a usable key the data column says so.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer

from mesh.cli._common import (
    arun,
    confirm,
    err_console,
    parse_time,
    print_json,
    print_table,
    say,
    settings,
)
from mesh.cli._tables import Col
from mesh.config import Settings
from mesh.errors import NotFound, ValidationError
from mesh.history import PayloadReader, delivery_doc, event_doc
from mesh.storage import DeliveryRow, EventRow, PruneResult, Store, open_store
from mesh.subjects import validate_name

DATA_WIDTH = 40
T = TypeVar("T")

# A group whose bare form still lists events: `mesh events [--source S ...]`, and
# `mesh events prune ...` beside it.
events_app = typer.Typer(add_completion=False)


def register(app: typer.Typer) -> None:
    app.add_typer(events_app, name="events")
    app.command("deliveries")(deliveries)


def _when(value: datetime) -> str:
    # Table cells are narrow: seconds in UTC are enough there; --json has the full time.
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= DATA_WIDTH else text[: DATA_WIDTH - 1] + "…"


async def _query(s: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    store = await open_store(s.database_url)
    try:
        return await fn(store)
    finally:
        await store.close()


EVENT_COLUMNS = [
    Col("time", keep=2),
    Col("id", keep=0, ident=True),
    Col("source", keep=0),
    Col("type", keep=0, flex=True),
    Col("seq", keep=3),
    Col("data", keep=1, flex=True),
]


@events_app.callback(invoke_without_command=True)
def events(
    ctx: typer.Context,
    source: str | None = typer.Option(None, "--source", help="Only events from this source."),
    type_: str | None = typer.Option(
        None, "--type", help="An event type or a pattern (order.*, order.>)."
    ),
    since: str | None = typer.Option(None, "--since", help="2h, 30m, 7d or an ISO 8601 time."),
    limit: int = typer.Option(20, "--limit", min=1, max=100_000, help="At most this many."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document, data included."),
) -> None:
    """Stored events, newest first, with their data decrypted for display.

    `mesh events prune` deletes old ones.
    """
    if ctx.invoked_subcommand is not None:
        return
    s = settings()
    if source is not None:
        validate_name(source, "source name")
    since_time = parse_time(since) if since else None

    async def run(store: Store) -> list[EventRow]:
        return await store.query_events(source=source, type=type_, since=since_time, limit=limit)

    rows = arun(_query(s, run))
    reader = PayloadReader(s)
    docs = [event_doc(r, reader.data(r)) for r in rows]
    if reader.problem:
        err_console.print(f"[yellow]payloads not decrypted:[/] {reader.problem}")
    if as_json:
        print_json(docs)
        return
    print_table(
        None,
        EVENT_COLUMNS,
        [
            [_when(r.time), r.id, r.source, r.type, r.stream_seq, _short(d["data"])]
            for r, d in zip(rows, docs, strict=True)
        ],
    )


DELIVERY_COLUMNS = [
    Col("at", keep=1),
    Col("target", keep=0),
    Col("attempt", keep=0),
    Col("outcome", keep=0),
    Col("status", keep=2),
    Col("latency ms", keep=3),
    Col("error", keep=1, flex=True),
    Col("instance", keep=4, ident=True),
]


def deliveries(
    event_id: str = typer.Option(..., "--event", help="The event id (see `mesh events`)."),
    as_json: bool = typer.Option(False, "--json"),
    trace: bool = typer.Option(
        False, "--trace", help="Add the trace id each attempt carried (JSON always has it)."
    ),
) -> None:
    """Every delivery attempt recorded for one event, oldest first."""
    s = settings()

    async def run(store: Store) -> tuple[EventRow | None, list[DeliveryRow]]:
        return await store.get_event(event_id), await store.query_deliveries(event_id)

    event, attempts = arun(_query(s, run))
    if event is None and not attempts:
        raise NotFound(f"no event {event_id!r} in the database (see `mesh events`)")
    if as_json:
        print_json(
            {
                "event": None if event is None else event_doc(event, PayloadReader(s).data(event)),
                "deliveries": [delivery_doc(d) for d in attempts],
            }
        )
        return
    if event is not None:
        err_console.print(
            f"event {event.id}: {event.source} {event.type} at {event.time.isoformat()}"
        )
    if not attempts:
        err_console.print("no delivery attempts recorded")
        return
    columns = DELIVERY_COLUMNS + ([Col("trace id", keep=0)] if trace else [])
    print_table(
        None,
        columns,
        [
            [
                _when(d.at),
                d.target,
                d.attempt,
                d.outcome,
                d.status_code,
                None if d.latency_ms is None else f"{d.latency_ms:.1f}",
                d.error,
                d.instance,
                *([d.trace_id] if trace else []),
            ]
            for d in attempts
        ],
    )


# Retention -------------------------------------------------------------------------

_PRUNED = {
    "events": "event(s)",
    "deliveries": "delivery attempt(s)",
    "health_checks": "heartbeat sample(s)",
    "dead_letters": "dead letter(s)",
}


def _cutoff(option: str, text: str | None, now: datetime) -> datetime | None:
    if text is None:
        return None
    try:
        when = parse_time(text, now)
    except ValidationError as exc:
        raise ValidationError(f"{option}: {exc}") from None
    if when > now:
        raise ValidationError(
            f"{option} {text!r} is in the future: that would delete everything;"
            " give an age (30d) or a past time"
        )
    return when


@events_app.command("prune")
def prune(
    older_than: str | None = typer.Option(
        None,
        "--older-than",
        help="Events stored before this (30d, 12h or an ISO 8601 time), with their delivery"
        " attempts; an event with an attempt after it stays.",
    ),
    health_older_than: str | None = typer.Option(
        None, "--health-older-than", help="Heartbeat samples (health_checks) before this."
    ),
    dead_letters_older_than: str | None = typer.Option(
        None,
        "--dead-letters-older-than",
        help="Dead-letter rows before this (the MESH_DLQ stream is `mesh dlq purge`).",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, max=50_000, help="Rows per transaction (MESH_PRUNE_BATCH)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would go; delete nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete stored rows older than a cutoff, in batches (asks first unless --yes).

    The sink does this by itself by MESH_EVENT_RETENTION_DAYS and
    MESH_HEALTH_RETENTION_DAYS; the audit log is never pruned.
    """
    s = settings()
    now = datetime.now(UTC)
    events_before = _cutoff("--older-than", older_than, now)
    health_before = _cutoff("--health-older-than", health_older_than, now)
    dead_before = _cutoff("--dead-letters-older-than", dead_letters_older_than, now)
    cutoffs = {"events": events_before, "health_checks": health_before, "dead_letters": dead_before}
    if all(c is None for c in cutoffs.values()):
        raise ValidationError(
            "nothing to prune: give --older-than, --health-older-than or --dead-letters-older-than"
        )
    asked = [t for t in _PRUNED if cutoffs["events" if t == "deliveries" else t] is not None]

    def listed(result: PruneResult) -> str:
        counts = result.as_dict()
        return ", ".join(f"{counts[t]} {_PRUNED[t]}" for t in asked)

    async def run(store: Store) -> PruneResult:
        async def go(dry: bool) -> PruneResult:
            return await store.prune(
                events_before=events_before,
                health_checks_before=health_before,
                dead_letters_before=dead_before,
                batch_size=batch_size or s.prune_batch,
                dry_run=dry,
            )

        if dry_run or not yes:
            plan = await go(True)
            if dry_run or plan.total == 0:
                return plan
            confirm(f"pruning {listed(plan)}", f"delete {listed(plan)} for good?")
        return await go(False)

    result = arun(_query(s, run))
    if as_json:
        print_json(
            {
                "dry_run": dry_run,
                "cutoffs": {k: None if v is None else v.isoformat() for k, v in cutoffs.items()},
                "counts": {t: result.as_dict()[t] for t in asked},
            }
        )
        return
    if result.total == 0:
        say("nothing to prune: no rows older than the cutoff")
    elif dry_run:
        say(f"would prune {listed(result)}")
    else:
        say(f"pruned {listed(result)}")


__all__ = ["deliveries", "events", "prune", "register"]
