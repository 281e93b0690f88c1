"""``mesh backup create|verify|list`` and ``mesh restore ARCHIVE`` (mesh/backup).

Every place an archive goes or comes from may be a directory (a file) or
``s3://BUCKET[/PREFIX]`` (mesh/backup/remote.py, the s3 extra).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import typer

from mesh.backup import (
    ArchiveError,
    RestoreResult,
    Verified,
    create_backup,
    list_archives,
    read_passphrase,
    restore_archive,
    verify_archive,
)
from mesh.backup import recipient as backup_key
from mesh.backup.archive import ArchiveReader
from mesh.backup.remote import (
    S3Location,
    create_backup_s3,
    fetch_archive,
    is_s3,
    list_remote,
    scratch_dir,
)
from mesh.cli._common import arun, print_json, print_table, say, settings
from mesh.cli._progress import progress_bar
from mesh.errors import ValidationError

backup_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Backups of the whole mesh."
)

PASSPHRASE_HELP = (
    "File whose first line is the passphrase sealing the keys (MESH_BACKUP_PASSPHRASE_FILE)."
)


def register(app: typer.Typer) -> None:
    app.add_typer(backup_app, name="backup")
    app.command("restore")(restore)


def _passphrase(path: Path | None) -> bytes:
    return read_passphrase(path or settings().backup_passphrase_file)


def _maybe_passphrase(path: Path | None) -> bytes | None:
    """The passphrase if one is given; a backup without one seals to the home's key."""
    path = path or settings().backup_passphrase_file
    return None if path is None else read_passphrase(path)


T = TypeVar("T")


def _archive(path: Path) -> Path:
    if not path.is_file():
        raise ValidationError(f"no archive at {path}")
    return path


def _on_archive(
    archive: str,
    progress: Callable[[str, int, int], None],
    run: Callable[[Path], Coroutine[Any, Any, T]],
) -> T:
    """``run`` on the archive's file: the local one, or a scratch copy of an s3:// one."""
    if not is_s3(archive):
        return arun(run(_archive(Path(archive))))

    async def fetched() -> T:
        with scratch_dir("restore") as tmp:
            return await run(await fetch_archive(archive, tmp, progress))

    return arun(fetched())


def _name(archive: str) -> str:
    return archive.rstrip("/").rpartition("/")[2]


@backup_app.command("create")
def create(
    to: str = typer.Option(
        "", "--to", help="Directory or s3://BUCKET[/PREFIX] for the archive (MESH_BACKUP_DIR)."
    ),
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", help=PASSPHRASE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Back up streams, KV buckets, tables and the sealed keys into one archive.

    The keys are sealed to the home's backup key (made by the first backup given a
    passphrase, or by `mesh backup key`); with no passphrase the backup needs none.
    """
    s = settings()
    passphrase = _maybe_passphrase(passphrase_file)
    with progress_bar("backup") as update:
        if is_s3(to):
            result = arun(create_backup_s3(s, to, passphrase, update))
        else:
            result = arun(create_backup(s, Path(to) if to else s.backups_dir, passphrase, update))
    if as_json:
        print_json(result.doc())
        return
    events = result.manifest["streams"]
    say(
        f"backup {result.where} ({result.size:,} bytes, {result.seconds:.1f}s):"
        f" {len(events)} streams, {sum(v['messages'] for v in events.values()):,} messages,"
        f" {sum(result.manifest['tables'].values()):,} rows"
    )


@backup_app.command("key")
def key(
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", help=PASSPHRASE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make (or check) the home's backup key: later backups then need no passphrase."""
    s = settings()
    passphrase = _passphrase(passphrase_file)
    prepared = backup_key.prepare(s.home, passphrase)
    doc = {
        "backup_key": f"x25519:{prepared.recipient.fingerprint}",
        "file": str(s.home / backup_key.RECIPIENT_FILE),
        "made": prepared.made,
    }
    if as_json:
        print_json(doc)
        return
    said = "made" if prepared.made else "opens with this passphrase"
    say(f"backup key {doc['backup_key']} ({said}): {doc['file']}")


@backup_app.command("verify")
def verify(
    archive: str = typer.Argument(..., help="The archive to check (a file or s3://...)."),
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", help=PASSPHRASE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check checksums, row counts, and that the keys open with the passphrase.

    Without a passphrase (a server that holds only the backup key) everything but
    opening the keys is checked, and the output says so.
    """
    passphrase = _maybe_passphrase(passphrase_file)
    with progress_bar("verify") as update:

        async def check(path: Path) -> Verified:
            return await asyncio.to_thread(verify_archive, path, passphrase, update)

        v = _on_archive(archive, update, check)
    doc = v.doc(archive)
    if as_json:
        print_json(doc)
        return
    if v.keys_opened:
        keys = f"keys {', '.join(doc['keys'])} open"
    else:
        keys = f"keys sealed to {doc['sealed_to']}, not opened (no passphrase given)"
    say(
        f"ok {_name(archive)}: {sum(doc['streams'].values()):,} messages in"
        f" {len(doc['streams'])} streams, {sum(doc['tables'].values()):,} rows, {keys}"
    )


@backup_app.command("list")
def list_(
    directory: str = typer.Option(
        "", "--dir", help="A directory or s3://BUCKET[/PREFIX] (default MESH_BACKUP_DIR)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The archives in the backup directory, oldest first."""
    where: Any = directory or settings().backups_dir
    rows = arun(list_remote(S3Location.parse(where))) if is_s3(where) else _list_local(where)
    if as_json:
        print_json(rows)
        return
    print_table(
        f"backups in {where}",
        ["archive", "created", "bytes", "messages", "rows", "problem"],
        [
            [
                r["archive"],
                _short(r["created"]),
                r["bytes"],
                r["messages"],
                r["rows"],
                r["problem"] or "",
            ]
            for r in rows
        ],
    )


def _list_local(where: Path | str) -> list[dict[str, Any]]:
    rows = []
    for p in list_archives(Path(where)):
        try:
            with ArchiveReader(p) as r:
                m = r.manifest
            rows.append(
                {
                    "archive": p.name,
                    "created": m["created"],
                    "bytes": p.stat().st_size,
                    "messages": sum(v["messages"] for v in m["streams"].values()),
                    "rows": sum(m["tables"].values()),
                    "problem": None,
                }
            )
        except ArchiveError as exc:
            rows.append(
                {
                    "archive": p.name,
                    "created": None,
                    "bytes": p.stat().st_size,
                    "messages": None,
                    "rows": None,
                    "problem": str(exc),
                }
            )
    return rows


def _short(iso: str | None) -> str:
    return "-" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def restore(
    archive: str = typer.Argument(..., help="The archive to restore (a file or s3://...)."),
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", help=PASSPHRASE_HELP),
    force: bool = typer.Option(
        False, "--force", help="Replace a mesh that is there (streams, rows, keys)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Restore an archive into an empty MESH_HOME / database / broker; then `mesh up`."""
    s = settings()
    passphrase = _passphrase(passphrase_file)
    with progress_bar("restore") as update:

        async def run(path: Path) -> RestoreResult:
            return await restore_archive(s, path, passphrase, force=force, progress=update)

        result = _on_archive(archive, update, run)
    if as_json:
        print_json(result.doc(archive))
        return
    say(
        f"restored {_name(archive)} in {result.seconds:.1f}s:"
        f" {sum(result.streams.values()):,} messages in {len(result.streams)} streams,"
        f" {sum(result.tables.values()):,} rows, keys {', '.join(sorted(result.verified.keys))};"
        " now `mesh up`"
    )
