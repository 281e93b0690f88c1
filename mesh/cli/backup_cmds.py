"""``mesh backup create|verify|list`` and ``mesh restore ARCHIVE`` (mesh/backup)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from mesh.backup import (
    ArchiveError,
    create_backup,
    list_archives,
    read_passphrase,
    restore_archive,
    verify_archive,
)
from mesh.backup.archive import ArchiveReader
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


def _archive(path: Path) -> Path:
    if not path.is_file():
        raise ValidationError(f"no archive at {path}")
    return path


@backup_app.command("create")
def create(
    to: str = typer.Option("", "--to", help="Directory for the archive (default MESH_BACKUP_DIR)."),
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", help=PASSPHRASE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Back up streams, KV buckets, tables and the sealed keys into one archive."""
    s = settings()
    if to.startswith("s3://"):
        raise ValidationError("s3:// destinations are not supported yet: give a directory")
    directory = Path(to) if to else s.backups_dir
    passphrase = _passphrase(passphrase_file)
    with progress_bar("backup") as update:
        result = arun(create_backup(s, directory, passphrase, update))
    if as_json:
        print_json(result.doc())
        return
    events = result.manifest["streams"]
    say(
        f"backup {result.path} ({result.size:,} bytes, {result.seconds:.1f}s):"
        f" {len(events)} streams, {sum(v['messages'] for v in events.values()):,} messages,"
        f" {sum(result.manifest['tables'].values()):,} rows"
    )


@backup_app.command("verify")
def verify(
    archive: Path = typer.Argument(..., help="The archive to check."),
    passphrase_file: Path | None = typer.Option(None, "--passphrase-file", help=PASSPHRASE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check checksums, row counts, and that the keys open with the passphrase."""
    passphrase = _passphrase(passphrase_file)
    with progress_bar("verify") as update:
        v = verify_archive(_archive(archive), passphrase, update)
    if as_json:
        print_json(v.doc(archive))
        return
    doc = v.doc(archive)
    say(
        f"ok {archive.name}: {sum(doc['streams'].values()):,} messages in"
        f" {len(doc['streams'])} streams, {sum(doc['tables'].values()):,} rows,"
        f" keys {', '.join(doc['keys'])} open"
    )


@backup_app.command("list")
def list_(
    directory: Path | None = typer.Option(None, "--dir", help="Default MESH_BACKUP_DIR."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The archives in the backup directory, oldest first."""
    where = directory or settings().backups_dir
    rows = []
    for p in list_archives(where):
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


def _short(iso: str | None) -> str:
    return "-" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def restore(
    archive: Path = typer.Argument(..., help="The archive to restore."),
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
        result = arun(
            restore_archive(s, _archive(archive), passphrase, force=force, progress=update)
        )
    if as_json:
        print_json(result.doc(archive))
        return
    say(
        f"restored {archive.name} in {result.seconds:.1f}s:"
        f" {sum(result.streams.values()):,} messages in {len(result.streams)} streams,"
        f" {sum(result.tables.values()):,} rows, keys {', '.join(sorted(result.verified.keys))};"
        " now `mesh up`"
    )
