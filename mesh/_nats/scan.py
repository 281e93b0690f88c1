"""Reading a stream range without disturbing anything (``scan``): replay, the DLQ tools,
key rotation and backup read through it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from mesh._nats.pull import raise_if_cancelled
from mesh.errors import BrokerError

SCAN_BATCH = 512
SCAN_FETCH_TIMEOUT_S = 1.0
SCAN_INACTIVE_S = 60.0


async def scan(
    js: JetStreamContext,
    stream: str,
    filters: list[str],
    *,
    start_time: datetime | None = None,
    start_seq: int | None = None,
    batch: int = SCAN_BATCH,
    on_total: Callable[[int], None] | None = None,
) -> AsyncIterator[Msg]:
    """Yield the stream's messages on ``filters`` from ``start_time`` or ``start_seq``
    (or the start).

    Reads through an ephemeral, unacknowledged pull consumer (nothing durable is
    disturbed) and stops at the stream's last message as it was when the scan
    began, so writing to the same stream while scanning cannot make it endless.
    ``on_total`` is told how many messages the range holds (an upper bound).
    """
    if not filters:
        return
    try:
        info = await js.stream_info(stream)
    except js_errors.NotFoundError:
        raise BrokerError(f"stream {stream} does not exist: run `mesh init`") from None
    last_seq = info.state.last_seq
    if not info.state.messages or not last_seq:
        if on_total:
            on_total(0)
        return
    by_seq = DeliverPolicy.BY_START_SEQUENCE if start_seq else DeliverPolicy.ALL
    cfg = ConsumerConfig(
        description="mesh scan (ephemeral)",
        deliver_policy=DeliverPolicy.BY_START_TIME if start_time else by_seq,
        opt_start_time=start_time,
        opt_start_seq=start_seq if not start_time else None,
        ack_policy=AckPolicy.NONE,
        filter_subjects=list(filters),
        inactive_threshold=SCAN_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
        max_waiting=1,
    )
    try:
        ci = await js.add_consumer(stream, cfg)
    except js_errors.Error as exc:
        raise BrokerError(f"cannot read {stream}: {exc.description or exc}") from None
    name = ci.name
    if on_total:
        on_total(int(ci.num_pending or 0))
    if not ci.num_pending:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
        return
    sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=SCAN_FETCH_TIMEOUT_S)
            except (nats_errors.TimeoutError, TimeoutError):
                raise_if_cancelled()
                # Nothing came: finished when the consumer has nothing pending.
                try:
                    ci = await js.consumer_info(stream, name)
                except (nats_errors.Error, js_errors.Error) as exc:
                    raise _lost(stream, exc) from None
                if not ci.num_pending:
                    return
                continue
            except (nats_errors.Error, js_errors.Error) as exc:
                raise _lost(stream, exc) from None
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.stream > last_seq:
                    return
                yield msg
                if meta.sequence.stream >= last_seq or meta.num_pending == 0:
                    return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)


def _lost(stream: str, exc: Exception) -> BrokerError:
    why = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return BrokerError(f"reading {stream} was interrupted ({why}); running it again is safe")
