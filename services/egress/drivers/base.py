"""The delivery-driver interface: what the egress needs from any destination.

A driver connects to one target's system, sends one event or a batch, classifies what
happened as success / retry / permanent failure (an ``AttemptResult``), and closes.
Everything else (retries and their backoff, the circuit breaker, the rate limit,
ordering, dead letters, delivery records) is the worker's, written once above the
drivers (services/egress/worker.py, services/egress/outcomes.py).

``send`` never raises for trouble at the destination: it answers with a result. A
driver connects lazily and drops its connection after a connection-level failure, so
the next attempt (a durable redelivery) connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from mesh.envelope import Event
from mesh.errors import MeshError
from mesh.registry import Target
from services.egress.http.sender import AttemptResult

ERROR_CHARS = 300  # of an error's text kept for the records and the DLQ


class MissingExtra(MeshError):
    """The library of a target's kind is not installed (one line: what to install)."""


class Driver(ABC):
    """Delivers to one target. One instance per target per egress instance."""

    kind: ClassVar[str]

    def __init__(self, target: Target) -> None:
        self.target = target
        self._connect_lock = asyncio.Lock()
        self.connected = False
        self.generation = 0  # counts connections: a late failure closes only its own

    # Lifecycle ------------------------------------------------------------------

    def ready(self) -> str | None:
        """Why nothing can be sent with this configuration now (the target is parked
        rather than its events burnt), or None."""
        return None

    def update(self, target: Target) -> bool:
        """Take a changed registry entry; True when the connection must be made again."""
        old, self.target = self.target, target
        return (old.url_enc, old.url, old.options) != (target.url_enc, target.url, target.options)

    async def connect(self) -> None:
        """Open the connection (idempotent; concurrent callers share one attempt)."""
        if self.connected:
            return
        async with self._connect_lock:
            if not self.connected:
                await self._open()
                self.connected = True
                self.generation += 1

    async def close(self, generation: int | None = None) -> None:
        """Close the connection (only if it is still ``generation``); harmless twice."""
        if generation is not None and generation != self.generation:
            return  # another send has connected anew since
        was, self.connected = self.connected, False
        if was:
            # Closing a broken connection may fail too; it is gone either way.
            with contextlib.suppress(Exception):
                await self._shut()

    # Sending --------------------------------------------------------------------

    async def send(self, event: Event, trace: dict[str, str] | None = None) -> AttemptResult:
        """Deliver one event within the target's timeout; never raises for trouble at
        the destination. ``trace``: W3C trace headers of the attempt, for transports
        whose headers are not the event's own (HTTP)."""
        started = time.monotonic()
        generation = self.generation
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await self.connect()
                generation = self.generation
                await self._send(event)
        except TimeoutError:
            await self.close(generation)
            return AttemptResult(
                error=f"timeout after {self.target.timeout_s:g}s",
                latency_s=time.monotonic() - started,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return await self._failed(exc, started, generation)
        return AttemptResult(delivered=True, latency_s=time.monotonic() - started)

    async def send_batch(
        self, events: Sequence[Event], traces: Sequence[dict[str, str] | None] | None = None
    ) -> list[AttemptResult]:
        """Deliver several events; one result per event, in order. ``traces``: each
        event's ``send`` trace headers (HTTP's). The default connects once, starts every
        ``_send`` at once (``_begin``; in order: a library that numbers its publishes, as AMQP's
        confirms and MQTT's packet ids do, keeps that order on the wire) and awaits them
        together under one deadline, the target's timeout; a system with a batch API
        overrides it. An ordered target sends one at a time (batches of one)."""
        if len(events) == 1:
            return [await self.send(events[0], traces[0] if traces else None)]
        started = time.monotonic()
        generation = self.generation
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await self.connect()
        except TimeoutError:
            await self.close(generation)
            return [self._timed_out(started)] * len(events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connecting failed: nothing of the batch went out
            return [await self._failed(exc, started, generation)] * len(events)
        generation = self.generation
        tasks = [self._begin(event) for event in events]
        try:
            await asyncio.wait(
                tasks, timeout=max(0.0, started + self.target.timeout_s - time.monotonic())
            )
        except BaseException:  # cancelled (the egress stopping): the sends go with us
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            raise
        late = [task for task in tasks if not task.done()]
        for task in late:
            task.cancel()  # past the deadline: abandoned, as ``send``'s timeout does
        if late:
            await asyncio.wait(late)
        latency = time.monotonic() - started
        results: list[AttemptResult] = []
        drop = False
        for task in tasks:
            if task.cancelled():
                results.append(self._timed_out(started))
                drop = True
            elif (error := task.exception()) is not None:
                if not isinstance(error, Exception):
                    raise error
                results.append(
                    AttemptResult(
                        error=describe(error)[:ERROR_CHARS],
                        permanent=self.is_permanent(error),
                        latency_s=latency,
                    )
                )
                drop = drop or self.drops_connection(error)
            else:
                results.append(AttemptResult(delivered=True, latency_s=latency))
        if drop:
            await self.close(generation)
        return results

    def _timed_out(self, started: float) -> AttemptResult:
        return AttemptResult(
            error=f"timeout after {self.target.timeout_s:g}s",
            latency_s=time.monotonic() - started,
        )

    async def _failed(
        self, exc: Exception, started: float, generation: int | None = None
    ) -> AttemptResult:
        permanent = self.is_permanent(exc)
        if self.drops_connection(exc):
            await self.close(generation)
        return AttemptResult(
            error=describe(exc)[:ERROR_CHARS],
            permanent=permanent,
            latency_s=time.monotonic() - started,
        )

    # To implement ---------------------------------------------------------------

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _shut(self) -> None: ...

    @abstractmethod
    async def _send(self, event: Event) -> None:
        """Send one event; return once the system has acknowledged it; raise otherwise."""

    def _begin(self, event: Event) -> asyncio.Future[Any]:
        """Start sending one event of a batch: a future that ends as ``_send`` would.
        The default runs ``_send`` as a task; a driver whose library answers through
        callbacks (MQTT's PUBACKs) returns a future of its own, sparing a task per event."""
        return asyncio.ensure_future(self._send(event))

    def is_permanent(self, exc: Exception) -> bool:
        """Whether no retry can fix this failure (the event is dead-lettered at once)."""
        return isinstance(exc, MeshError)  # a template the event cannot fill, and the like

    def drops_connection(self, exc: Exception) -> bool:
        """Whether the connection is to be made anew after this failure."""
        return True


def describe(exc: BaseException) -> str:
    text, name = str(exc).strip(), type(exc).__name__
    if text.startswith(name):  # aiokafka's errors name themselves
        return text
    return f"{name}: {text}" if text else name


def need(module: str, kind: str) -> Any:
    """Import a driver's library, or raise ``MissingExtra`` with what to install."""
    import importlib

    from mesh.destinations import missing_extra

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            missing_extra(kind) or f"the {kind} driver needs {module}: pip install 'mesh[{kind}]'"
        ) from None
