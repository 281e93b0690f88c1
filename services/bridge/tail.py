"""What feeds tail sessions: ordered reads of a target's subjects, and a frame cache.

A ``TailReader`` is one ordered consumer (nats.py re-creates it after a gap or a
broker restart from the last sequence it saw) whose frames go to its sessions
through ``Session.offer``, which never repeats a sequence.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from mesh._nats.types import ConsumerConfig, DeliverPolicy, Msg, js_errors, nats_errors
from mesh.errors import DecodeError, MeshError
from services.bridge.frames import CLOSE_ERROR, event_frame, to_json

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.delivery import Deliveries


class Listener(Protocol):
    """A session fed by a tail reader (``Session``)."""

    async def offer(self, seq: int, frame: str) -> None: ...

    def close_soon(self, code: int, reason: str) -> Any: ...


class FrameCache:
    """Tail frames by (target, seq), bounded in count and bytes, oldest out first.

    Shared by every reader of a bridge: clients resuming from the same point (all
    of them after a bridge restart, say) cost one decrypt, decode and encoding.
    A None frame means "not for this target".
    """

    def __init__(self, max_items: int = 4096, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.size = 0
        self._items: dict[tuple[str, int], str | None] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, int]) -> tuple[str | None] | None:
        if key not in self._items:
            return None
        return (self._items[key],)

    def put(self, key: tuple[str, int], frame: str | None) -> None:
        if key in self._items or (frame is not None and len(frame) > self.max_bytes // 8):
            return
        self._items[key] = frame
        self.size += len(frame or "")
        while self._items and (len(self._items) > self.max_items or self.size > self.max_bytes):
            old = self._items.pop(next(iter(self._items)))
            self.size -= len(old or "")


class TailReader:
    """An ordered consumer over a target's filter subjects, fanned out to sessions.

    Live tails of a target share one (one consumer, one decode and one JSON
    encoding per event however many clients listen); a tail resuming from a
    sequence or a time has its own.
    """

    def __init__(
        self,
        target: str,
        filters: list[str],
        *,
        shared: bool,
        client: MeshClient,
        deliveries: Deliveries,
        frames: FrameCache,
        log: Any,
        heartbeat_s: float,
    ) -> None:
        self.client = client
        self.deliveries = deliveries
        self.frames = frames
        self.heartbeat_s = heartbeat_s
        self.target = target
        self.filters = filters
        self.shared = shared
        self.sessions: set[Listener] = set()
        self.floor = 1
        self.sub: Any = None
        self.log = log.bind(target=target, tail="shared" if shared else "own")

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return (self.target, tuple(self.filters))

    async def start_for(self, since_seq: int | None, since_time: datetime | None) -> int:
        """The first stream sequence to deliver: given, found by time, or the next one."""
        port, stream = self.client.port, self.client.names.events
        if since_seq is not None:
            return since_seq
        if since_time is not None:
            when = since_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
            try:
                # nats.py's get_msg has no start_time; the server API does (2.11+).
                resp = await port.api_request(
                    f"STREAM.MSG.GET.{stream}",
                    json.dumps({"start_time": when}).encode(),
                    timeout=5,
                )
                return int(resp["message"]["seq"])
            except js_errors.NotFoundError:
                pass  # nothing at or after that time: from the next event on
        info = await port.stream_info(stream)
        return int(info.state.last_seq) + 1

    async def open(self, start: int) -> None:
        # Always by start sequence: nats.py re-creates an ordered consumer after a gap or a
        # broker restart from its last seen sequence, keeping the rest of this config.
        self.floor = start
        cfg = ConsumerConfig(
            filter_subjects=self.filters,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            mem_storage=True,
        )
        self.sub = await self.client.port.subscribe_stream(
            self.filters[0],
            stream=self.client.names.events,
            config=cfg,
            ordered_consumer=True,
            idle_heartbeat=self.heartbeat_s,
            cb=self._on_msg,
        )

    async def close(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _frame(self, msg: Msg, seq: int) -> str | None:
        """The frame for a message, or None when the target must not see it."""
        try:
            event = self.deliveries.decode(msg, seq)
        except DecodeError as exc:
            self.log.warning("undecodable event skipped in tail", seq=seq, error=str(exc))
            return None
        try:
            verdict = await self.deliveries.route_event(self.target, event, size=len(msg.data))
            if verdict.event is None:
                return None
            event = verdict.event
        except (MeshError, nats_errors.Error, OSError, TimeoutError) as exc:
            # A tail is a read of the target's subjects: show it rather than skip it.
            self.log.warning("route check failed; delivered", seq=seq, error=str(exc))
        return to_json(event_frame(event, seq))

    async def _on_msg(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq < self.floor:
            # A re-created ordered consumer that had seen nothing restarts at 1: skip what
            # was delivered or not asked for. No repeats, whatever nats.py does.
            return
        self.floor = seq + 1
        if not self.sessions:
            return
        key = (self.target, seq)
        cached = self.frames.get(key)
        if cached is not None:
            frame = cached[0]
        else:
            frame = await self._frame(msg, seq)
            self.frames.put(key, frame)
        if frame is None:
            return
        for session in list(self.sessions):
            try:
                await session.offer(seq, frame)
            except Exception as exc:
                self.log.error("tail offer failed", error=repr(exc))
                session.close_soon(CLOSE_ERROR, "internal error")
