"""Reading a stream range without disturbing anything (``scan``): replay, the DLQ tools,
key rotation and backup read through it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
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
    cfg = _scan_config(filters, start_time=start_time, start_seq=start_seq)
    name, sub, pending = await _open(js, stream, cfg)
    if on_total:
        on_total(pending)
    if not pending:
        await _close(js, stream, name, sub)
        return
    last_yielded = 0  # the stream sequence of the last message handed out
    seen = 0  # the consumer sequence of the same: deliveries are numbered 1, 2, ...
    try:
        while True:
            try:
                msgs = await _fetch(sub, batch)
            except (nats_errors.TimeoutError, TimeoutError):
                raise_if_cancelled()
                # Nothing came: finished when the consumer has nothing pending and delivered
                # nothing we did not see. A fetch that timed out on our side can still have
                # been answered (under load): those messages are gone from an unacknowledged
                # consumer, so read again from the first one we missed.
                try:
                    ci = await js.consumer_info(stream, name)
                except (nats_errors.Error, js_errors.Error) as exc:
                    raise _lost(stream, exc) from None
                if ci.delivered.consumer_seq > seen:
                    name, sub = await _reopen(js, stream, name, sub, _resume(cfg, last_yielded))
                    seen = 0
                    continue
                if not ci.num_pending:
                    return
                continue
            except (nats_errors.Error, js_errors.Error) as exc:
                raise _lost(stream, exc) from None
            gap = False
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.consumer != seen + 1:
                    gap = True  # an earlier, timed-out fetch took some: read them again
                    break
                seen = meta.sequence.consumer
                if meta.sequence.stream > last_seq:
                    return
                last_yielded = meta.sequence.stream
                yield msg
                if meta.sequence.stream >= last_seq or meta.num_pending == 0:
                    return
            if gap:
                name, sub = await _reopen(js, stream, name, sub, _resume(cfg, last_yielded))
                seen = 0
    finally:
        await _close(js, stream, name, sub)


async def _fetch(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    return await sub.fetch(batch, timeout=SCAN_FETCH_TIMEOUT_S)


def _scan_config(
    filters: list[str], *, start_time: datetime | None, start_seq: int | None
) -> ConsumerConfig:
    by_seq = DeliverPolicy.BY_START_SEQUENCE if start_seq else DeliverPolicy.ALL
    return ConsumerConfig(
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


def _resume(cfg: ConsumerConfig, last_yielded: int) -> ConsumerConfig:
    """The same scan, from the message after the last one handed out."""
    if not last_yielded:
        return cfg
    return replace(
        cfg,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_time=None,
        opt_start_seq=last_yielded + 1,
    )


async def _open(
    js: JetStreamContext, stream: str, cfg: ConsumerConfig
) -> tuple[str, JetStreamContext.PullSubscription, int]:
    try:
        ci = await js.add_consumer(stream, cfg)
        sub = await js.pull_subscribe_bind(consumer=ci.name, stream=stream)
    except (nats_errors.Error, js_errors.Error) as exc:
        why = getattr(exc, "description", None) or exc
        raise BrokerError(f"cannot read {stream}: {why}") from None
    return ci.name, sub, int(ci.num_pending or 0)


async def _reopen(
    js: JetStreamContext,
    stream: str,
    name: str,
    sub: JetStreamContext.PullSubscription,
    cfg: ConsumerConfig,
) -> tuple[str, JetStreamContext.PullSubscription]:
    """The scan's consumer again, from where ``cfg`` starts (the old one is removed)."""
    await _close(js, stream, name, sub)
    name, sub, _ = await _open(js, stream, cfg)
    return name, sub


async def _close(
    js: JetStreamContext, stream: str, name: str, sub: JetStreamContext.PullSubscription
) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, name)


def _lost(stream: str, exc: Exception) -> BrokerError:
    why = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return BrokerError(f"reading {stream} was interrupted ({why}); running it again is safe")
