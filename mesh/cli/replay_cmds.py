"""``mesh replay``: a target's past events again, for that target only."""

from __future__ import annotations

import contextlib
from typing import Any

import typer

from mesh.cli._common import arun, connected, parse_time, print_json, print_table, say
from mesh.cli._progress import progress_bar
from mesh.cli._tables import Col
from mesh.errors import MeshError
from mesh.replay import ReplayProgress, ReplayResult, replay


def register(app: typer.Typer) -> None:
    app.command("replay")(replay_cmd)


REPLAY_COLUMNS = [
    Col("seq", keep=2),
    Col("stored at (UTC)", keep=1),
    Col("source", keep=0),
    Col("type", keep=0, flex=True),
    Col("event id", keep=0, ident=True),
]


def replay_cmd(
    target: str = typer.Option(..., "--target", help="The target to replay events to."),
    since: str = typer.Option(..., "--since", help="A duration ago (2h, 30m, 7d) or ISO 8601."),
    until: str | None = typer.Option(None, "--until", help="End of the window (default: now)."),
    types: str | None = typer.Option(None, "--types", help="Only types matching, e.g. order.*"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be replayed."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-deliver a target's past events to that target only (original ids, marked as replays)."""
    start = parse_time(since)
    end = parse_time(until) if until is not None else None

    queued: list[int] = []  # the target's queue before the replay, when it can be read

    async def run() -> ReplayResult:
        async with connected() as c:
            if not dry_run:
                with contextlib.suppress(Exception):
                    depth = await c.deliveries.queue_depth(await c.target_or_error(target))
                    queued.append(int(depth["lag"]))
            with progress_bar("replay" if not dry_run else "scan") as update:

                def on_progress(p: ReplayProgress) -> None:
                    update(target, p.scanned, p.total)

                return await replay(
                    c, target, start, end, types, dry_run=dry_run, progress=on_progress
                )

    try:
        result = arun(run())
    except KeyboardInterrupt:
        raise MeshError(
            "replay interrupted: running the same command again is safe (copies already made"
            " within the stream's duplicate window are stored once; receivers dedupe on the id)"
        ) from None
    if as_json:
        print_json(_replay_doc(result) | {"already_queued": queued[0] if queued else None})
        return
    if dry_run:
        say(
            f"would replay [bold]{result.matched}[/] event(s) to {target}"
            f" (scanned {result.scanned} on {', '.join(result.filters)})"
        )
        print_table(
            None,
            REPLAY_COLUMNS,
            [
                [i.seq, f"{i.stored_at:%Y-%m-%d %H:%M:%S}", i.source, i.type, i.id]
                for i in result.sample
            ],
        )
        if result.matched > len(result.sample):
            say(f"... and {result.matched - len(result.sample)} more")
        return
    line = f"replayed {result.published} event(s) to {target}"
    if result.duplicates:
        line += f"; {result.duplicates} already replayed within the duplicate window (stored once)"
    if result.skipped:
        line += f"; {result.skipped} skipped (not routed to {target}, or originated there)"
    if queued:
        # What the next consume sees: the replayed copies and what was waiting before them.
        line += (
            f"; {queued[0]} were already queued for {target}"
            f" ({queued[0] + result.published} in all)"
        )
    say(line)


def _replay_doc(r: ReplayResult) -> dict[str, Any]:
    return {
        "target": r.target,
        "since": r.since.isoformat() if r.since else None,
        "until": r.until.isoformat() if r.until else None,
        "from_seq": r.from_seq,
        "to_seq": r.to_seq,
        "types": r.types,
        "filters": r.filters,
        "dry_run": r.dry_run,
        "scanned": r.scanned,
        "matched": r.matched,
        "published": r.published,
        "duplicates": r.duplicates,
        "skipped": r.skipped,
        "sample": [
            {
                "seq": i.seq,
                "id": i.id,
                "source": i.source,
                "type": i.type,
                "stored_at": i.stored_at.isoformat(),
            }
            for i in r.sample
        ],
    }


__all__ = ["register"]
