"""Operations commands: replay, dlq, keys."""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mesh import dlq as dlq_ops
from mesh import keys as key_ops
from mesh.cli._common import (
    arun,
    connected,
    console,
    err_console,
    parse_time,
    print_json,
    print_table,
    settings,
)
from mesh.client import MeshClient
from mesh.errors import BrokerUnavailable, MeshError, NotFound, ValidationError
from mesh.replay import ReplayProgress, ReplayResult, replay

# One-line messages are never wrapped at the terminal width (they get grepped and pasted).
say = functools.partial(console.print, soft_wrap=True, highlight=False)
note = functools.partial(err_console.print, soft_wrap=True, highlight=False)

dlq_app = typer.Typer(help="Dead letters: list, show, replay, purge.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Encryption keys: status, rotate, reencrypt, prune.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.command("replay")(replay_cmd)
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(keys_app, name="keys")


def show_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """A table whose id columns are never wrapped or cut (they get pasted into commands)."""
    table = Table(title=title, header_style="bold")
    for col in columns:
        ident = col.endswith("id")
        if col == "last error":  # the full text is in `mesh dlq show ID`
            table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=60)
        else:
            table.add_column(col, no_wrap=ident, min_width=32 if ident else None)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    console.print(table)


# Progress -----------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    """Items per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


class CountColumn(ProgressColumn):
    """Done out of total (the total may be unknown)."""

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else f"{int(task.total):,}"
        return Text(f"{int(task.completed):,}/{total}", style="progress.download")


@contextmanager
def progress_bar(what: str) -> Iterator[Callable[[str, int, int], None]]:
    """A rich bar (count, rate, ETA) on a terminal, silent otherwise.

    Yields ``update(label, done, total)``.
    """
    tty = sys.stderr.isatty()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        CountColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not tty,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(f"{what} {label}", total=total or None)
            progress.update(tasks[label], completed=done, total=max(total, done) or None)

        yield update


# replay ----------------------------------------------------------------------------


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

    async def run() -> ReplayResult:
        async with connected() as c:
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
        print_json(_replay_doc(result))
        return
    if dry_run:
        say(
            f"would replay [bold]{result.matched}[/] event(s) to {target}"
            f" (scanned {result.scanned} on {', '.join(result.filters)})"
        )
        show_table(
            None,
            ["seq", "stored at (UTC)", "source", "type", "event id"],
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
    say(line)


def _replay_doc(r: ReplayResult) -> dict[str, Any]:
    return {
        "target": r.target,
        "since": r.since.isoformat(),
        "until": r.until.isoformat() if r.until else None,
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


# dlq --------------------------------------------------------------------------------


def _since(value: str | None) -> datetime | None:
    return parse_time(value) if value is not None else None


async def _check_target(c: MeshClient, target: str | None) -> None:
    """An unknown --target is an error unless dead letters for it remain."""
    if target is None:
        return
    try:
        await c.target_or_error(target)
    except NotFound:
        info = await c.js.stream_info(c.names.dlq, subjects_filter=c.subjects.dlq(target))
        if not info.state.subjects:
            raise


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


ENTRY_COLUMNS = [
    "seq",
    "event id",
    "target",
    "source/type",
    "attempts",
    "dead at (UTC)",
    "last error",
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
            await _check_target(c, target)
            return await dlq_ops.list_dead_letters(c, target, start, limit)

    listing = arun(run())
    if as_json:
        print_json([e.doc() for e in listing.entries])
        return
    if not listing.entries:
        say("no dead letters" + (f" for {target}" if target else ""))
    else:
        show_table(
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
            if k.startswith("ce-") or k == "mesh-encryption"
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
            await _check_target(c, target)
            wanted = set(ident)
            with progress_bar("dlq replay") as update:
                total = 0

                def on_total(n: int) -> None:
                    nonlocal total
                    total = n
                    update("", 0, n)

                async def entries() -> AsyncIterator[dlq_ops.DlqEntry]:
                    async for e in dlq_ops.iter_dead_letters(c, target, start, on_total=on_total):
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
            await _check_target(c, target)
            plan = await dlq_ops.plan_purge(c, target, start)
            if plan.count == 0:
                return 0
            what = f"{plan.count} dead letter(s)" + (f" for {target}" if target else "")
            if not yes:
                if not sys.stdin.isatty():
                    raise ValidationError(f"purging {what} needs confirmation: pass --yes")
                if not typer.confirm(f"delete {what} for good?", default=False):
                    raise typer.Abort()
            return await dlq_ops.purge(c, plan)

    n = arun(run())
    if as_json:
        print_json({"purged": n})
    elif n == 0:
        say("no dead letters to purge" + (f" for {target}" if target else ""))
    else:
        say(f"purged {n} dead letter(s)")


# keys -------------------------------------------------------------------------------


@keys_app.command("status")
def keys_status(
    usage: bool = typer.Option(
        False, "--usage", help="Also count what each key still protects (scans every store)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The key ring: keys, ages, and a warning when the primary is due for rotation."""
    s = settings()
    ring = key_ops.load_ring(s)
    st = key_ops.key_status(s, ring)
    used: key_ops.KeyUsage | None = None
    if usage:

        async def run() -> key_ops.KeyUsage:
            async with connected(s) as c:
                with progress_bar("scan") as update:
                    return await key_ops.key_usage(s, ring, c, update)

        used = arun(run())
    if as_json:
        doc = st.doc()
        if used is not None:
            doc["usage"] = used.doc()
        print_json(doc)
    else:
        rows = []
        for k in st.keys:
            row: list[Any] = [
                k.id,
                "primary" if k.primary else "old (read only)",
                k.created.isoformat(timespec="seconds"),
                f"{k.age_days:.1f}",
            ]
            if used is not None:
                row.append(", ".join(f"{n} {s}" for s, n in used.for_key(k.id).items()) or "-")
            rows.append(row)
        cols = ["key", "role", "created", "age (days)"] + (["still protects"] if used else [])
        print_table(f"keys in {st.file}", cols, rows)
        if used is not None:
            for store, n in used.undecryptable().items():
                note(f"{n} token(s) in {store} open with no key in the ring")
            for text in used.notes:
                note(text)
    if st.warning:
        note(f"warning: {st.warning}")


@keys_app.command("rotate")
def keys_rotate(
    reencrypt: bool = typer.Option(
        False, "--reencrypt", help="Then rewrite stored payloads under the new key."
    ),
    batch_size: int = typer.Option(key_ops.DEFAULT_BATCH, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Add a new primary key; old keys stay for reading."""
    s = settings()
    key = key_ops.rotate(s)
    doc: dict[str, Any] = {"primary": key.id}
    if not as_json:
        say(f"new primary key {key.id}; older keys still decrypt")
        note(
            f"processes using {s.key_path} follow it by themselves (new events use the new"
            " key within seconds); copy the file to any other machine that shares this mesh"
        )
    if reencrypt:
        doc["reencrypt"] = _reencrypt(s, batch_size, restart=False, as_json=as_json).doc()
    if as_json:
        print_json(doc)


@keys_app.command("reencrypt")
def keys_reencrypt(
    batch_size: int = typer.Option(key_ops.DEFAULT_BATCH, "--batch-size", min=1),
    restart: bool = typer.Option(
        False, "--restart", help="Ignore the checkpoint of a stopped run."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rewrite stored payloads under the primary key (resumes a run that was interrupted)."""
    result = _reencrypt(settings(), batch_size, restart=restart, as_json=as_json)
    if as_json:
        print_json(result.doc())


def _reencrypt(s: Any, batch_size: int, *, restart: bool, as_json: bool) -> key_ops.ReencryptResult:
    ring = key_ops.load_ring(s)

    async def run() -> key_ops.ReencryptResult:
        with progress_bar("re-encrypt") as update:
            try:
                async with connected(s) as c:
                    return await key_ops.reencrypt(
                        s, ring, c, batch_size=batch_size, progress=update, restart=restart
                    )
            except BrokerUnavailable:
                return await key_ops.reencrypt(
                    s, ring, None, batch_size=batch_size, progress=update, restart=restart
                )

    try:
        result = arun(run())
    except KeyboardInterrupt:
        raise MeshError("re-encryption interrupted: run `mesh keys reencrypt` to resume") from None
    if not as_json:
        if result.resumed:
            say("resumed an interrupted re-encryption")
        for table, t in result.tables.items():
            say(
                f"{table}: {t.rewritten} row(s) re-encrypted under {result.primary},"
                f" {t.current} already were"
                + (f", {t.undecryptable} open with no key in the ring" if t.undecryptable else "")
            )
        say(f"registry secrets re-sealed: {result.secrets_resealed}")
        for text in result.notes:
            note(text)
    return result


@keys_app.command("prune")
def keys_prune(
    key_ids: list[str] = typer.Argument(
        None, metavar="[KEY_ID]...", help="Default: every old key."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Remove old keys that nothing stored needs any more; refuse (and say why) otherwise."""
    s = settings()
    ring = key_ops.load_ring(s)
    candidates = key_ops.prune_candidates(ring, key_ids or None)
    if not candidates:
        if as_json:
            print_json({"removed": [], "refused": {}})
        else:
            say("nothing to prune: the ring holds only the primary key")
        return

    async def run() -> key_ops.PruneResult:
        async with connected(s) as c:
            with progress_bar("scan") as update:
                usage = await key_ops.key_usage(s, ring, c, update)
        return key_ops.plan_prune(usage, candidates)

    plan = arun(run())
    if plan.removed and not yes:
        if not sys.stdin.isatty():
            raise ValidationError(
                f"removing key(s) {', '.join(plan.removed)} needs confirmation: pass --yes"
            )
        if not typer.confirm(f"remove key(s) {', '.join(plan.removed)} for good?", default=False):
            raise typer.Abort()
    plan.removed = key_ops.apply_prune(s, plan) if plan.removed else []
    if as_json:
        print_json({"removed": plan.removed, "refused": plan.refused})
    else:
        for key_id in plan.removed:
            say(f"removed key {key_id}")
    if plan.refused:
        raise MeshError("; ".join(plan.reasons()) + f" ({plan.hint()})")


__all__ = ["register"]
