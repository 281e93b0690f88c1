"""``mesh dlq``: list, show, replay and purge dead letters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import typer

from mesh import dlq as dlq_ops
from mesh import envelope
from mesh.cli._common import (
    arun,
    confirm,
    connected,
    note,
    parse_time,
    print_json,
    print_table,
    say,
)
from mesh.cli._progress import progress_bar
from mesh.cli._tables import Col
from mesh.errors import MeshError, NotFound

dlq_app = typer.Typer(help="Dead letters: list, show, replay, purge.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")


def _since(value: str | None) -> datetime | None:
    return parse_time(value) if value is not None else None


def _entry_rows(entries: list[dlq_ops.DlqEntry]) -> list[list[Any]]:
    return [
        [
            e.seq,
            e.event_id,
            e.target,
            f"{e.source or '?'} {e.type or '?'}",
            e.letter.attempts,
            f"{e.letter.at.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
            e.letter.error,
        ]
        for e in entries
    ]


# What gives way at 80 columns: attempts, then target, then the time; ids get shortened.
ENTRY_COLUMNS = [
    Col("seq", keep=0),
    Col("event id", keep=0, ident=True),
    Col("target", keep=2),
    Col("source/type", keep=0, flex=True),
    Col("attempts", keep=3),
    Col("dead at (UTC)", keep=1),
    Col("last error", keep=0, flex=True),
]


@dlq_app.command("list")
def dlq_list(
    target: str | None = typer.Option(None, "--target"),
    since: str | None = typer.Option(None, "--since", help="A duration ago or ISO 8601."),
    limit: int | None = typer.Option(None, "--limit", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Dead letters, oldest first, with their last error and attempts."""
    start = _since(since)

    async def run() -> dlq_ops.DlqListing:
        async with connected() as c:
            ref = await dlq_ops.check_target(c, target)
            return await dlq_ops.list_dead_letters(c, ref, start, limit)

    listing = arun(run())
    if as_json:
        print_json([e.doc() for e in listing.entries])
        return
    if not listing.entries:
        say("no dead letters" + (f" for {target}" if target else ""))
    else:
        print_table(
            f"dead letters ({len(listing.entries)})", ENTRY_COLUMNS, _entry_rows(listing.entries)
        )
    if listing.unreadable:
        note(f"{listing.unreadable} message(s) on the DLQ are not dead letters")


@dlq_app.command("show")
def dlq_show(
    ident: str = typer.Argument(..., metavar="ID", help="Event id, dead letter id or DLQ seq."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One dead letter in full (the payload stays encrypted)."""

    async def run() -> list[dlq_ops.DlqEntry]:
        async with connected() as c:
            return await dlq_ops.find(c, ident)

    found = arun(run())
    docs = []
    for e in found:
        doc = e.doc()
        doc["headers"] = {
            k: v
            for k, v in e.letter.headers.items()
            if k.startswith(envelope.CE_PREFIX) or k == "mesh-encryption"
        }
        docs.append(doc)
    if as_json:
        print_json(docs if len(docs) != 1 else docs[0])
        return
    for doc in docs:
        for k, v in doc.items():
            if k == "headers":
                for hk, hv in v.items():
                    say(f"  {hk}: {hv}")
            else:
                say(f"{k:17} {v}")
        say()


@dlq_app.command("replay")
def dlq_replay(
    target: str | None = typer.Option(None, "--target"),
    since: str | None = typer.Option(None, "--since", help="Dead letters from this time on."),
    ident: list[str] = typer.Option([], "--id", help="Only this event / dead letter id (repeat)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Send dead letters back through normal delivery (fresh attempts); they leave the DLQ."""
    start = _since(since)

    async def run() -> dlq_ops.DlqReplayResult:
        async with connected() as c:
            ref = await dlq_ops.check_target(c, target)
            wanted = set(ident)
            with progress_bar("dlq replay") as update:
                total = 0

                def on_total(n: int) -> None:
                    nonlocal total
                    total = n
                    update("", 0, n)

                async def entries() -> AsyncIterator[dlq_ops.DlqEntry]:
                    async for e in dlq_ops.iter_dead_letters(c, ref, start, on_total=on_total):
                        if not wanted or e.event_id in wanted or e.letter.id in wanted:
                            yield e

                return await dlq_ops.replay_dead_letters(
                    c, entries(), progress=lambda done: update("", done, total)
                )

    result = arun(run())
    kept = len(result.failed) + len(result.skipped)
    if result.replayed + kept == 0:
        raise NotFound(
            "nothing to replay: no dead letters"
            + (f" for {target}" if target else "")
            + (f" since {start.isoformat()}" if start else "")
            + (f" with id {', '.join(ident)}" if ident else "")
        )
    if as_json:
        print_json(
            {
                "replayed": result.replayed,
                "duplicates": result.duplicates,
                "failed": [asdict(k) for k in result.failed],
                "skipped": [asdict(k) for k in result.skipped],
                "disabled_targets": sorted(result.disabled_targets),
            }
        )
    else:
        say(f"replayed {result.replayed} dead letter(s); they left the DLQ")
        for k in result.skipped:
            note(f"kept {k.event_id} (seq {k.seq}): {k.reason}")
        for k in result.failed:
            note(f"failed {k.event_id} (seq {k.seq}): {k.reason}")
        for name in sorted(result.disabled_targets):
            note(f"target {name} is disabled: its events wait until `mesh target enable {name}`")
    if kept:
        raise MeshError(f"{kept} dead letter(s) could not be replayed; they stay in the DLQ")


@dlq_app.command("purge")
def dlq_purge(
    target: str | None = typer.Option(None, "--target"),
    since: str | None = typer.Option(None, "--since", help="Only dead letters from this time on."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete dead letters for good (asks first unless --yes)."""
    start = _since(since)

    async def run() -> int:
        async with connected() as c:
            ref = await dlq_ops.check_target(c, target)
            plan = await dlq_ops.plan_purge(c, ref, start)
            if plan.count == 0:
                return 0
            what = f"{plan.count} dead letter(s)" + (f" for {target}" if target else "")
            if not yes:
                confirm(f"purging {what}", f"delete {what} for good?")
            return await dlq_ops.purge(c, plan)

    n = arun(run())
    if as_json:
        print_json({"purged": n})
    elif n == 0:
        say("no dead letters to purge" + (f" for {target}" if target else ""))
    else:
        say(f"purged {n} dead letter(s)")


__all__ = ["register"]
