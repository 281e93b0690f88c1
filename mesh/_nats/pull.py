"""The pull loop behind ``Deliveries.pull`` and ``consume`` (``pull_batches``): fetch
batches from a durable consumer forever, surviving broker restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import nats.errors as nats_errors
import nats.js.errors as js_errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh._nats.pullfeed import PullFeed
from mesh.resilience import PULL_BACKOFF

log = structlog.get_logger("mesh.client")  # the client's logger, as before the split

# Consecutive failed fetches (not timeouts) before the pull subscription is re-created.
PULL_RESUBSCRIBE_AFTER = 5


def raise_if_cancelled() -> None:
    """Raise CancelledError when this task was asked to stop, even if the request was lost.

    nats.py waits for messages through ``asyncio.wait_for``, which on Python 3.11 drops a
    cancellation that races with the awaited thing finishing (CPython gh-86296): a fetch
    cancelled just as its 408 "request timeout" arrives returns as a timeout. A loop that
    retries on timeouts would then run on, and the caller that cancelled it (``wait_for``
    around ``anext``, a service stopping) would wait for it forever. ``Task.cancelling()``
    still counts the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pull_batches(
    nc: NATS,
    stream: str,
    consumer: str,
    *,
    batch: int = 10,
    expires: float = 2.0,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[list[Msg], None]:
    """Fetch batches from a durable consumer forever, surviving broker restarts.

    Every fetch sends a fresh pull request, so a loop survives a server
    restart (nats.py #504 is a pull subscription that waits on a request the
    restarted server forgot). The subscription itself is kept across
    reconnects: nats.py re-subscribes its inbox, and a new inbox would strand
    whatever the server sends to a request made through the old one until
    ack_wait. It is re-created only when the consumer is gone or fetches keep
    failing.
    """
    feed: PullFeed | None = None
    backoff = PULL_BACKOFF.first_s
    failures = 0
    try:
        while stop is None or not stop.is_set():
            if nc.is_closed:
                return
            try:
                if feed is None:
                    feed = await PullFeed(nc, stream, consumer).open()
                msgs = await feed.fetch(batch, timeout=expires)
                backoff = PULL_BACKOFF.first_s
                failures = 0
            except (nats_errors.TimeoutError, TimeoutError):
                raise_if_cancelled()
                continue
            except nats_errors.ConnectionClosedError:
                return
            except (nats_errors.Error, js_errors.Error, OSError) as exc:
                log.debug("pull retry", consumer=consumer, error=str(exc) or type(exc).__name__)
                failures += 1
                gone = isinstance(exc, js_errors.NotFoundError | js_errors.ServiceUnavailableError)
                if feed is not None and (gone or failures >= PULL_RESUBSCRIBE_AFTER):
                    await feed.close()
                    feed = None
                    failures = 0
                await asyncio.sleep(backoff)
                backoff = PULL_BACKOFF.next(backoff)
                continue
            if msgs:
                yield msgs
    finally:
        # A closed generator (break, aclose) must not leave its inbox subscribed; what
        # arrived for it and was never handed out goes back (nak) at once.
        if feed is not None:
            await feed.close()
