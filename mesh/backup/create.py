"""``mesh backup create``: streams, then tables, then keys, into one archive.

The order makes the archive consistent for the sink: a stream snapshot holds the
sink consumers' ack floor, and the sink acks only after its commit, so every event
acked in the snapshot is in the tables read after it; events not yet acked come
again after a restore and are written idempotently. The key ring only grows
(``prune`` removes keys nothing needs), so reading it last covers every payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mesh import __version__
from mesh._nats.types import NATS, JetStreamContext
from mesh._nats.types import connect as nats_connect
from mesh.backup import jetstream, tables
from mesh.backup import recipient as backup_key
from mesh.backup.archive import (
    FORMAT,
    KEYS,
    SQLITE_MEMBER,
    ArchiveWriter,
    archive_name,
    sha256_file,
)
from mesh.backup.recipient import Recipient
from mesh.backup.seal import check_passphrase, read_key_dir
from mesh.broker import EmbeddedBroker, free_port, port_free
from mesh.config import Settings
from mesh.durability import SyncMode
from mesh.errors import BrokerError, BrokerUnavailable, ConfigError

#: Progress callback: (label, done, total).
Progress = Callable[[str, int, int], None]


@dataclass
class BackupResult:
    path: Path
    size: int
    seconds: float
    manifest: dict[str, Any]
    location: str | None = None  # where it went when not ``path`` (an s3:// URL)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: streams, tables, ...

    @property
    def where(self) -> str:
        return self.location or str(self.path)

    def doc(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "archive": self.where,
            "bytes": self.size,
            "seconds": round(self.seconds, 3),
            "streams": {k: v["messages"] for k, v in m["streams"].items()},
            "tables": m["tables"],
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
        }


@asynccontextmanager
async def broker_connection(
    settings: Settings, *, live_ok: bool = True, restoring: bool = False
) -> AsyncIterator[NATS]:
    """A connection to the mesh's broker.

    With MESH_NATS_URL, that server. Embedded: the running ``mesh up`` when its port
    answers, else a temporary nats-server on the home's store (on a free port).

    ``restoring``: the temporary server runs with nats-server's default sync interval.
    A server that fsyncs every write (``sync_interval: always``, the embedded default)
    restores a stream message by message with an fsync each, and gives up on a
    restore it cannot finish in about 5 s ("read/write on closed pipe"); the clean
    stop at the end writes everything to disk before ``mesh up`` starts.
    """
    broker: EmbeddedBroker | None = None
    opts = settings.connect_options()
    if settings.embedded and port_free("127.0.0.1", settings.nats_port):
        broker = EmbeddedBroker(
            settings.nats_store_dir,
            port=free_port(),
            log_file=settings.home / "nats-backup.log",
            sync=SyncMode.LAZY if restoring else SyncMode(settings.broker_sync),
        )
        settings.home.mkdir(parents=True, exist_ok=True)
        await broker.astart()
        opts["servers"] = [broker.url]
    elif settings.embedded and not live_ok:
        raise ConfigError(
            f"a mesh is running on {settings.home} (port {settings.nats_port}):"
            " stop it first, or pass --force"
        )
    try:
        try:
            nc = await nats_connect(**opts, allow_reconnect=False, max_reconnect_attempts=0)
        except Exception as exc:
            where = ", ".join(opts["servers"])
            raise BrokerUnavailable(
                f"cannot connect to NATS at {where}: {exc or type(exc).__name__}"
            ) from None
        try:
            yield nc
        finally:
            await nc.close()
    finally:
        if broker is not None:
            await broker.astop()


async def create_backup(
    settings: Settings,
    directory: Path,
    passphrase: bytes | None,
    progress: Progress | None = None,
    *,
    recipient: Recipient | None = None,
) -> BackupResult:
    """One archive in ``directory``, its keys sealed to the home's backup key.

    ``passphrase``: checked against the home's backup key (one scrypt, while the streams
    are read), or makes one when the home has none or it does not open it; ``None``
    seals to the home's key as it is, with no derivation (``mesh/backup/recipient.py``).
    ``recipient``: a key already prepared, which a long-running caller (the scheduled
    service) keeps for every round.
    """
    if passphrase is not None:
        check_passphrase(passphrase)
    elif recipient is None:
        recipient = prepare_key(settings, None)  # no derivation: fails before any work
    started = time.monotonic()
    now = datetime.now(UTC)
    archive_id = uuid.uuid4().hex
    writer = ArchiveWriter(directory, archive_name(now, archive_id))
    # The passphrase's derivation is slow on purpose; it runs while the streams are read.
    sealing: asyncio.Future[Recipient]
    if recipient is not None:
        sealing = asyncio.get_running_loop().create_future()
        sealing.set_result(recipient)
    else:
        sealing = asyncio.ensure_future(asyncio.to_thread(prepare_key, settings, passphrase))
    phases: dict[str, float] = {}
    try:
        manifest = await _write(settings, writer, archive_id, now, sealing, progress, phases)
        mark = time.monotonic()
        path = await asyncio.to_thread(writer.finish, manifest)
        phases["finish"] = time.monotonic() - mark
    except BaseException:
        writer.discard()
        if not sealing.done():
            sealing.cancel()
        raise
    size = (await asyncio.to_thread(path.stat)).st_size
    return BackupResult(path, size, time.monotonic() - started, manifest, phases=phases)


def prepare_key(settings: Settings, passphrase: bytes | None) -> Recipient:
    """The home's backup key (made or checked with the passphrase when one is given)."""
    return backup_key.prepare(settings.home, passphrase).recipient


async def _snapshot(
    nc: NATS, js: JetStreamContext, name: str, writer: ArchiveWriter, progress: Progress | None
) -> dict[str, Any]:
    """One stream's snapshot and config as members; its manifest entry."""
    info = await js.stream_info(name)
    total = info.state.bytes

    def step(done: int) -> None:
        if progress:
            progress(f"stream {name}", done, max(total, done))

    with writer.member(f"streams/{name}.snap") as out:
        meta = await jetstream.snapshot(nc, name, out, step)
    state = meta["state"]
    writer.put(f"streams/{name}.json", json.dumps(meta, sort_keys=True).encode())
    return {
        "messages": state.get("messages", 0),
        "bytes": state.get("bytes", 0),
        "first_seq": state.get("first_seq", 0),
        "last_seq": state.get("last_seq", 0),
        "consumers": state.get("consumer_count", 0),
        "replicas": meta["config"].get("num_replicas", 1),
    }


async def _write(
    settings: Settings,
    writer: ArchiveWriter,
    archive_id: str,
    now: datetime,
    sealing: asyncio.Future[Recipient],
    progress: Progress | None,
    phases: dict[str, float],
) -> dict[str, Any]:
    streams: dict[str, Any] = {}
    url = settings.db_url
    db_backend = tables.backend(url)
    copy = writer.staging / SQLITE_MEMBER

    def table_step(table: str, n: int) -> None:
        if progress:
            progress(f"table {table}", n, 0)

    def dump() -> tuple[dict[str, int], list[int], str | None]:
        copy.unlink(missing_ok=True)
        counts, migrations = tables.dump_sqlite(tables.sqlite_file(url), copy, table_step)
        # Hashed here, beside the snapshots, so adding it to the archive is a copy.
        return counts, migrations, sha256_file(copy) if copy.exists() else None

    early: asyncio.Future[tuple[dict[str, int], list[int], str | None]] | None = None
    moved = False
    mark = time.monotonic()
    async with broker_connection(settings) as nc:
        server = nc.connected_server_version
        js = nc.jetstream()
        names = await jetstream.mesh_streams(js, settings.prefix)
        if not names:
            raise BrokerError(
                f"no mesh streams on the broker (prefix {settings.prefix!r}): nothing to back up"
            )
        if db_backend == "sqlite":
            # SQLite is copied beside the snapshots (the server's work, mostly), and the
            # copy is kept when no consumer acked or was delivered anything meanwhile:
            # then the snapshots hold the consumers as they were at the copy, and the
            # order (streams, then tables) is met. Else it is copied again after them.
            marks = await jetstream.consumer_marks(nc, names)
            copy.parent.mkdir(parents=True, exist_ok=True)
            early = asyncio.ensure_future(asyncio.to_thread(dump))
        try:
            for name in names:
                streams[name] = await _snapshot(nc, js, name, writer, progress)
            if early is not None:
                moved = await jetstream.consumer_marks(nc, names) != marks
        except BaseException:
            if early is not None:
                with contextlib.suppress(Exception):
                    await early  # its thread writes into the staging directory
            raise
    phases["streams"] = time.monotonic() - mark
    writer.sync_soon()
    mark = time.monotonic()
    if early is not None:
        counts, migrations, sha = await early
        if moved:
            again = time.monotonic()
            counts, migrations, sha = await asyncio.to_thread(dump)
            phases["tables_again"] = time.monotonic() - again
        if sha is not None:
            await asyncio.to_thread(writer.add_file, SQLITE_MEMBER, sha)
        table_format = "sqlite"
    else:
        opener = writer.opener("tables/", ".msgpack")
        counts, migrations = await tables.dump_postgres(url, opener, table_step)
        table_format = "rows"
    phases["tables"] = time.monotonic() - mark
    mark = time.monotonic()
    keys = read_key_dir(settings.key_path.parent)
    if settings.encryption and settings.key_path.name not in keys:
        raise ConfigError(f"no key file at {settings.key_path}: nothing could read the payloads")
    key = await sealing
    writer.put(KEYS, backup_key.seal_to(key, keys, archive_id))
    phases["keys"] = time.monotonic() - mark  # the rest of the key derivation, if any
    return {
        "format": FORMAT,
        "id": archive_id,
        "created": now.isoformat(),
        "mesh_version": __version__,
        "nats_server_version": f"{server.major}.{server.minor}.{server.patch}",
        "prefix": settings.prefix,
        "source": {"database": db_backend, "embedded_broker": settings.embedded},
        "schema_migrations": migrations,
        "streams": streams,
        "tables": counts,
        "table_format": table_format,
        "keys": {
            "files": sorted(keys),
            "sealed_to": f"x25519:{key.fingerprint}",
            "kdf": "scrypt",  # of the sealed private key the archive carries
            "cipher": "AES-256-GCM",
        },
    }
