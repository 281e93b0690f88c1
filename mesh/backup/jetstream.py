"""Stream snapshots and restores through the JetStream API.

``$JS.API.STREAM.SNAPSHOT.<stream>`` makes the server (the stream's leader, in a
cluster) write a consistent snapshot of the stream's store and its consumers'
state, in chunks to a subject of ours; a chunk that carries a reply subject is
acked, which is the flow control: the server keeps a window of chunks in flight.
An empty chunk ends it. ``$JS.API.STREAM.RESTORE.<stream>`` answers with a
subject to send the chunks to, each one a request the server acks; an empty
request ends it and the answer is the restored stream's info.

Why a restore onto a server that fsyncs every write can fail (nats-server 2.15,
``processStreamRestore`` and ``RestoreStreamV2``): the server stores the snapshot
message by message, and answers a chunk only once its decoder has consumed it; the
decoder reads the s2 stream a block at a time (blocks of ~1 MiB of messages), so
one chunk's answer waits for a whole block to be stored, and a watchdog gives up on
a restore whose chunk takes 5 s ("restore ... is stalled", then "read/write on
closed pipe"). With ``sync_interval: always`` each message is an fsync: ~1,700 per
block, seconds on a busy disk. Smaller chunks do not help (the acks of 4 KiB chunks
are ~0 ms, then one takes the whole block's time: measured), so a restore runs where
the sync is lazy: ``mesh restore`` into an embedded home starts its temporary server
with the default sync interval, and the clean stop at the end writes everything to
disk before ``mesh up`` runs with the home's own sync mode. Streams with replicas
(R3) relax a per-write fsync to a sync per Raft flush and are not affected.

Streams of a mesh are found by name, not from a list: ``<PREFIX>_*`` (events,
dead letters, delivery records) and ``KV_<PREFIX>_*`` (every KV bucket: the
registry, circuits, revocations, and whatever buckets other parts add).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Protocol

from mesh._nats.types import NATS, JetStreamContext, Msg
from mesh.errors import BrokerError
from mesh.streams import StreamNames

CHUNK_SIZE = 128 * 1024  # restore chunks (each one a request the server answers)
#: Snapshot chunks and the window of unacked ones: the largest the server takes (it
#: clamps ``chunk_size`` to 1 KiB..1 MiB and ``window_size`` to 1 KiB..32 MiB).
SNAPSHOT_CHUNK = 1024 * 1024
SNAPSHOT_WINDOW = 32 * 1024 * 1024  # under nats.py's 64 MiB of pending bytes per subscription
#: Chunks handed to the writer thread and not yet written; past it, acks wait.
WRITE_AHEAD = 8
CHUNK_TIMEOUT_S = 30.0
API_TIMEOUT_S = 10.0


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


#: Progress callback: bytes done so far.
Progress = Callable[[int], None]


def stream_base(prefix: str) -> str:
    return StreamNames.for_prefix(prefix).events.removesuffix("_EVENTS")


def is_mesh_stream(name: str, prefix: str) -> bool:
    base = stream_base(prefix)
    return name.startswith(f"{base}_") or name.startswith(f"KV_{base}_")


async def mesh_streams(js: JetStreamContext, prefix: str) -> list[str]:
    """Names of the mesh's streams and KV buckets' streams, sorted."""
    names = await js.streams_info()
    return sorted(
        si.config.name for si in names if si.config.name and is_mesh_stream(si.config.name, prefix)
    )


async def consumer_marks(nc: NATS, streams: list[str]) -> dict[str, tuple[Any, ...]]:
    """Where every consumer of ``streams`` stands: ``stream/consumer`` -> its marks.

    Equal marks at two moments mean no consumer acked or was delivered anything in
    between: a delivery moves ``delivered.consumer_seq`` forward, and with none, an
    ack can only lower the pending count or raise the floor.
    """
    marks: dict[str, tuple[Any, ...]] = {}
    for stream in streams:
        offset = 0
        while True:
            doc = await _api(nc, f"$JS.API.CONSUMER.LIST.{stream}", {"offset": offset})
            page = doc.get("consumers") or []
            for ci in page:
                d, a = ci.get("delivered", {}), ci.get("ack_floor", {})
                marks[f"{stream}/{ci['name']}"] = (
                    ci.get("created"),
                    d.get("consumer_seq"),
                    d.get("stream_seq"),
                    a.get("consumer_seq"),
                    a.get("stream_seq"),
                    ci.get("num_ack_pending"),
                )
            offset += len(page)
            if not page or offset >= int(doc.get("total", 0)):
                break
    return marks


async def _api(nc: NATS, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=API_TIMEOUT_S)
    except TimeoutError:
        raise BrokerError(f"no answer from JetStream to {subject}") from None
    doc: dict[str, Any] = json.loads(reply.data)
    err = doc.get("error")
    if err:
        raise BrokerError(f"{subject}: {err.get('description', err)}")
    return doc


class _ChunkWriter:
    """Writes chunks to ``out`` in order on a thread of its own, a few ahead at most.

    The event loop goes on receiving (and acking) chunks while the last ones are
    hashed and written; ``put`` waits once ``WRITE_AHEAD`` are queued, which holds
    back the acks and so the server.
    """

    def __init__(self, out: Writer) -> None:
        self._out = out
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-snapshot")
        self._pending: deque[Future[int]] = deque()

    async def put(self, data: bytes) -> None:
        self._pending.append(self._pool.submit(self._out.write, data))
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # raises a write's error
        if len(self._pending) >= WRITE_AHEAD:
            await asyncio.wrap_future(self._pending.popleft())

    async def drain(self) -> None:
        while self._pending:
            await asyncio.wrap_future(self._pending.popleft())

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)


async def snapshot(
    nc: NATS, stream: str, out: Writer, progress: Progress | None = None
) -> dict[str, Any]:
    """Write the server's snapshot of ``stream`` to ``out``; its config and state."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_chunk(msg: Msg) -> None:
        await queue.put(msg)

    sub = await nc.subscribe(inbox, cb=on_chunk)
    writer = _ChunkWriter(out)
    try:
        meta = await _api(
            nc,
            f"$JS.API.STREAM.SNAPSHOT.{stream}",
            {
                "deliver_subject": inbox,
                "chunk_size": SNAPSHOT_CHUNK,
                "window_size": SNAPSHOT_WINDOW,
            },
        )
        size = 0
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), CHUNK_TIMEOUT_S)
            except TimeoutError:
                raise BrokerError(f"the snapshot of {stream} stalled") from None
            status = (msg.headers or {}).get("Status")
            if status and status not in ("204", "200"):
                what = (msg.headers or {}).get("Description", status)
                raise BrokerError(f"the snapshot of {stream} failed: {what}")
            if not msg.data:
                break
            await writer.put(msg.data)
            size += len(msg.data)
            if msg.reply:
                await nc.publish(msg.reply, b"")
            if progress:
                progress(size)
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return {"config": meta["config"], "state": meta["state"]}


async def restore(
    nc: NATS,
    meta: dict[str, Any],
    data: IO[bytes],
    *,
    replicas: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Restore one stream (and its consumers) from a snapshot file; the server's answer."""
    config = dict(meta["config"])
    if replicas is not None:
        config["num_replicas"] = replicas
    name = config["name"]
    # The snapshot's own placement (cluster name, tags) may not exist where we restore.
    config.pop("placement", None)
    doc = await _api(
        nc, f"$JS.API.STREAM.RESTORE.{name}", {"config": config, "state": meta["state"]}
    )
    deliver = doc["deliver_subject"]
    done = 0
    while chunk := await asyncio.to_thread(data.read, CHUNK_SIZE):
        try:
            ack = await nc.request(deliver, chunk, timeout=CHUNK_TIMEOUT_S)
        except TimeoutError:
            raise BrokerError(f"the restore of {name} stalled") from None
        if ack.data:
            err = json.loads(ack.data).get("error")
            if err:
                raise BrokerError(f"restore of {name}: {err.get('description', err)}{_hint(err)}")
        done += len(chunk)
        if progress:
            progress(done)
    try:
        final = await nc.request(deliver, b"", timeout=max(CHUNK_TIMEOUT_S, 120.0))
    except TimeoutError:
        raise BrokerError(f"the restore of {name} did not finish") from None
    result: dict[str, Any] = json.loads(final.data)
    err = result.get("error")
    if err:
        raise BrokerError(f"restore of {name}: {err.get('description', err)}{_hint(err)}")
    return result


def _hint(err: Any) -> str:
    if "closed pipe" in str(err) or "stalled" in str(err):
        return (
            " (the server gave up after 5 s on one block of messages: one that fsyncs"
            " every write, sync_interval: always, stores a restore message by message;"
            " restore with its default sync interval, then set it back)"
        )
    return ""


async def delete_stream(nc: NATS, name: str) -> None:
    await _api(nc, f"$JS.API.STREAM.DELETE.{name}", {})
