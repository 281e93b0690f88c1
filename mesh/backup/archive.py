"""The archive: one uncompressed tar a person can inspect with ``tar tf``.

Members, in this order::

    streams/<NAME>.snap      the server's snapshot (already s2-compressed by nats-server)
    streams/<NAME>.json      the stream's config and state at the snapshot
    tables/mesh.sqlite       SQLite: the database as its online backup copied it
    tables/<TABLE>.msgpack   PostgreSQL: each table's rows (mesh/backup/tables.py)
    keys.sealed              the key directory, sealed by the passphrase (mesh/backup/seal.py)
    manifest.json            versions, counts, and each member's size and sha256
    MANIFEST.sha256          sha256 of manifest.json (hex)

A truncated archive has no manifest: it ends with the manifest.

Stream snapshots are compressed by the server and payloads are ciphertext, so a
second compression would cost time for little. The archive is written under a
dot-name beside its final name (streamed, with no staging copy) and renamed when
complete: a half-written archive never looks like a backup.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from mesh.errors import ValidationError

FORMAT = 1
MANIFEST = "manifest.json"
MANIFEST_SUM = "MANIFEST.sha256"
KEYS = "keys.sealed"
SQLITE_MEMBER = "tables/mesh.sqlite"
SUFFIX = ".tar"
NAME_PREFIX = "mesh-backup-"
READ_CHUNK = 1024 * 1024
#: Bytes written between two writebacks started in the background (``sync_soon``).
SYNC_EVERY = 32 * 1024 * 1024


class ArchiveError(ValidationError):
    """An archive that is damaged, truncated or not a mesh backup."""


class _Hashing:
    """Writes through to the archive, hashing and counting."""

    def __init__(self, archive: ArchiveWriter) -> None:
        self._archive = archive
        self._f = archive._out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        n = self._f.write(data)
        self._archive._wrote(n)
        return n


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    info.mode = 0o600
    # GNU format: the header's length depends on the name only (a size past 8 GiB is
    # written base-256 in the same field), so it can be rewritten once the size is known.
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


class ArchiveWriter:
    """Writes the tar as members come: each member's data streams straight into the
    archive file behind a header that is rewritten with the size when it ends (one
    write of the data, no staging copy). The manifest goes last. A scratch directory
    beside it holds what must be a file first (the SQLite copy)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.path = directory / name
        self.partial = directory / f".{name}.partial"
        self.staging = directory / f".{name}.staging"
        self.files: dict[str, dict[str, Any]] = {}
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        # 0600: payloads are ciphertext and keys sealed, but subjects and the registry are not.
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._out: BinaryIO = os.fdopen(fd, "wb", buffering=READ_CHUNK)
        self._syncing: threading.Thread | None = None
        self._unsynced = 0

    @contextmanager
    def member(self, name: str, sha256: str | None = None) -> Iterator[_Hashing]:
        if name in self.files:
            raise ValueError(f"member {name} written twice")
        start = self._out.tell()
        header = _header(name, 0)
        self._out.write(header)
        out = _Hashing(self)
        yield out
        pad = -out.size % tarfile.BLOCKSIZE
        self._out.write(b"\0" * pad)
        end = self._out.tell()
        final = _header(name, out.size)
        if len(final) != len(header):
            raise ValueError(f"tar header of {name} changed length")
        self._out.seek(start)
        self._out.write(final)
        self._out.seek(end)
        self.files[name] = {"size": out.size, "sha256": sha256 or out.sha.hexdigest()}

    def opener(self, prefix: str, suffix: str) -> Any:
        """A function ``table -> writable file`` for members ``prefix + table + suffix``."""
        return lambda table: self.member(f"{prefix}{table}{suffix}")

    def add_file(self, name: str, sha256: str | None = None) -> None:
        """Copy a file from the scratch directory in as member ``name``.

        With its ``sha256`` known (hashed while other work waited on the server), the
        copy is the kernel's (``copy_file_range``), not read and hashed again here.
        """
        path = self.staging / name
        if sha256 is None:
            with path.open("rb") as f, self.member(name) as out:
                while chunk := f.read(READ_CHUNK):
                    out.write(chunk)
            return
        with path.open("rb") as f, self.member(name, sha256) as out:
            self._out.flush()
            size = os.fstat(f.fileno()).st_size
            start = self._out.tell()
            _copy_into(f.fileno(), self._out.fileno(), start, size)
            self._out.seek(start + size)  # the buffered writer's idea of the offset
            out.size = size
            self._wrote(size)

    def put(self, name: str, data: bytes) -> None:
        with self.member(name) as out:
            out.write(data)

    def _wrote(self, n: int) -> None:
        self._unsynced += n
        if self._unsynced >= SYNC_EVERY:
            self.sync_soon()

    def sync_soon(self) -> None:
        """Start writing what the archive holds so far to disk, on a thread.

        The disk writes the archive while the rest is read, and the fsync in
        ``finish`` waits only for the tail (without it, the whole archive's writes
        waited at the end with nothing else to do: measured). Waits for the previous
        one first, which keeps the writes at most ``SYNC_EVERY`` ahead of the disk.
        """
        self._wait_sync()
        self._unsynced = 0
        self._out.flush()
        fd = self._out.fileno()
        self._syncing = threading.Thread(
            target=os.fdatasync, args=(fd,), name="mesh-backup-sync", daemon=True
        )
        self._syncing.start()

    def _wait_sync(self) -> None:
        if self._syncing is not None:
            self._syncing.join()
            self._syncing = None

    def finish(self, manifest: dict[str, Any]) -> Path:
        manifest = {**manifest, "files": dict(self.files)}
        manifest_raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
        self.put(MANIFEST, manifest_raw)
        self.put(MANIFEST_SUM, (hashlib.sha256(manifest_raw).hexdigest() + "\n").encode())
        self._out.write(b"\0" * (tarfile.BLOCKSIZE * 2))  # end of archive
        self._out.flush()
        self._wait_sync()
        os.fsync(self._out.fileno())
        self._out.close()
        os.replace(self.partial, self.path)
        self.discard()
        return self.path

    def discard(self) -> None:
        self._wait_sync()  # its fd is about to close
        if not self._out.closed:
            self._out.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.partial.unlink(missing_ok=True)


def _copy_into(src: int, dst: int, start: int, size: int) -> None:
    """``size`` bytes of ``src`` to ``dst`` at ``start``: in the kernel where it can."""
    done = 0
    if hasattr(os, "copy_file_range"):  # Linux
        try:
            while done < size:
                n = os.copy_file_range(src, dst, size - done, done, start + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:  # another filesystem, an old kernel: copy it here
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
    while done < size:
        chunk = os.pread(src, min(READ_CHUNK, size - done), done)
        if not chunk:
            raise OSError(f"the file ended at {done} of {size} bytes")
        done += os.pwrite(dst, chunk, start + done)


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def archive_name(now: datetime, archive_id: str) -> str:
    return f"{NAME_PREFIX}{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{archive_id[:6]}{SUFFIX}"


# Reading --------------------------------------------------------------------------------


def _damaged(path: Path, why: str) -> ArchiveError:
    return ArchiveError(f"archive {path.name} is refused: {why}")


class ArchiveReader:
    """An archive opened for reading; ``manifest`` is checked against its checksum."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise ArchiveError(f"no archive at {path}") from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _damaged(path, f"not a readable tar archive ({exc})") from None
        try:
            members = {m.name: m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as exc:
            self.tar.close()
            raise _damaged(path, f"truncated or damaged ({exc})") from None
        first, second = members.get(MANIFEST_SUM), members.get(MANIFEST)
        if first is None or second is None:
            self.tar.close()
            why = "truncated (no manifest at its end)" if members else "not a mesh backup"
            raise _damaged(path, why)
        want = self._read(first).decode(errors="replace").strip()
        raw = self._read(second)
        if hashlib.sha256(raw).hexdigest() != want:
            self.tar.close()
            raise _damaged(path, "the manifest does not match its checksum")
        try:
            self.manifest: dict[str, Any] = json.loads(raw)
        except ValueError:
            self.tar.close()
            raise _damaged(path, "the manifest is not JSON") from None
        if self.manifest.get("format") != FORMAT:
            self.tar.close()
            raise _damaged(path, f"unknown archive format {self.manifest.get('format')!r}")

    def _read(self, info: tarfile.TarInfo) -> bytes:
        f = self.tar.extractfile(info)
        if f is None:
            raise _damaged(self.path, f"member {info.name} is not a file")
        try:
            return f.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _damaged(self.path, f"truncated ({exc})") from None

    def open(self, name: str) -> IO[bytes]:
        try:
            f = self.tar.extractfile(name)
        except KeyError:
            raise _damaged(self.path, f"member {name} is missing") from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _damaged(self.path, f"truncated or damaged ({exc})") from None
        if f is None:
            raise _damaged(self.path, f"member {name} is not a file")
        return f

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def check_files(self, progress: Any = None) -> int:
        """Every member's size and sha256 against the manifest; bytes read."""
        files: dict[str, dict[str, Any]] = self.manifest.get("files", {})
        try:
            present = {m.name: m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _damaged(self.path, f"truncated or damaged ({exc})") from None
        total = sum(int(f["size"]) for f in files.values())
        done = 0
        for name, want in files.items():
            info = present.get(name)
            if info is None:
                raise _damaged(self.path, f"member {name} is missing (truncated?)")
            if info.size != want["size"]:
                raise _damaged(
                    self.path, f"member {name} has {info.size} bytes, not {want['size']}"
                )
            sha = hashlib.sha256()
            with self.open(name) as f:
                try:
                    while chunk := f.read(READ_CHUNK):
                        sha.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise _damaged(self.path, f"member {name} is truncated ({exc})") from None
            if sha.hexdigest() != want["sha256"]:
                raise _damaged(self.path, f"member {name} does not match its checksum")
        return done

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_archives(directory: Path) -> list[Path]:
    """Archives in ``directory``, oldest first (names sort by time)."""
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir() if p.name.startswith(NAME_PREFIX) and p.suffix == SUFFIX
    )


def prune_archives(directory: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` archives; the ones removed."""
    archives = list_archives(directory)
    gone = archives[: max(len(archives) - keep, 0)] if keep > 0 else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
