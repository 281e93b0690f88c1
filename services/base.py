"""The shape of every long-running service: start, drain, close, heartbeats.

A service owns a MeshClient and its tasks. ``run`` drives one service alone
(``mesh serve NAME``); ``services.runner`` drives several in one process.

Every started service also

- publishes a heartbeat on ``<prefix>.sys.health.<service>.<instance>`` every
  ``heartbeat_interval_s`` (its ``stats()`` plus pid and reconnect count);
- registers as a NATS micro service named ``<prefix>-<service>``, so
  ``$SRV.PING`` (``nats micro ls``) discovers each instance; its one endpoint,
  ``<prefix>.sys.status.<service>.<instance>``, answers with the heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import warnings
from collections.abc import Coroutine
from typing import Any, ClassVar

import structlog

from mesh import __version__, tracing
from mesh._nats.types import MicroRequest, MicroService
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.observability import METRICS, Heartbeat, new_instance_id
from mesh.streams import ensure_streams


class Service:
    """Base class. Subclasses set ``name`` and override ``on_start`` / ``on_drain``."""

    name: ClassVar[str] = "service"

    def __init__(self, settings: Settings, *, instance: str | None = None) -> None:
        self.settings = settings
        self.instance = instance or new_instance_id()
        self.client = MeshClient(settings, name=f"{self.name}:{self.instance}")
        # Pull, decode, route check, records, dead letters: handed over, not client methods.
        self.deliveries = self.client.deliveries
        self.log = structlog.get_logger(f"mesh.{self.name}").bind(
            service=self.name, instance=self.instance
        )
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.heartbeat: Heartbeat | None = None
        self.micro: MicroService | None = None
        self.started = False

    # Hooks ------------------------------------------------------------------

    async def on_start(self) -> None:
        """Start the service's own work (spawn tasks here)."""

    async def on_drain(self, timeout: float) -> None:
        """Finish in-flight work within ``timeout``; ``stopping`` is already set."""

    async def on_close(self) -> None:
        """Release resources (after drain, before the NATS connection closes)."""

    def stats(self) -> dict[str, Any]:
        """What the heartbeat carries (JSON-serialisable, no secrets, no payloads)."""
        return {}

    def _heartbeat_stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "nats_reconnects": self.client.reconnects,
            **self.stats(),
        }

    # Discovery ------------------------------------------------------------------

    @property
    def micro_name(self) -> str:
        """The micro service name: ``<prefix>-<service>``, in the characters micro allows."""
        return re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.settings.prefix}-{self.name}")

    async def _register_micro(self) -> None:
        async def status(req: MicroRequest) -> None:
            assert self.heartbeat is not None
            await req.respond(self.heartbeat.payload())

        try:
            # nats.micro stamps times with datetime.utcnow(), deprecated from Python 3.12.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                svc = await self.client.port.add_micro_service(
                    name=self.micro_name,
                    version=__version__,
                    description=f"mesh {self.name} service",
                    metadata={
                        "service": self.name,
                        "instance": self.instance,
                        "prefix": self.settings.prefix,
                        "pid": str(os.getpid()),
                    },
                )
            await svc.add_endpoint(
                name="status",
                subject=f"{self.settings.prefix}.sys.status.{self.name}.{self.instance}",
                handler=status,
            )
        except Exception as exc:
            # Discovery is a convenience: a service that cannot register still works.
            self.log.warning("micro service registration failed", error=str(exc))
            return
        self.micro = svc

    # Lifecycle ----------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error("task failed", task=task.get_name(), error=repr(exc))

    async def start(self) -> None:
        tracing.configure(f"mesh-{self.name}")  # OTEL_* env; a no-op when off or done
        await self.client.connect()
        await ensure_streams(self.client.port, self.settings)
        self.heartbeat = Heartbeat(
            self.client.port,
            self.client.subjects.health(self.name, self.instance),
            self.name,
            self.instance,
            self._heartbeat_stats,
            self.settings.heartbeat_interval_s,
        )
        try:
            await self.on_start()
        except BaseException:
            # Half started (a port taken, say): release the tasks and the connection
            # before the error goes up; no "stopped" heartbeat for a service never seen.
            self.heartbeat = None
            with contextlib.suppress(Exception):
                await self.close()
            raise
        await self._register_micro()
        self.heartbeat.start()
        METRICS.service_up.labels(self.name).set(1)
        self.started = True
        self.log.info("service started")

    async def drain(self, timeout: float | None = None) -> None:
        timeout = self.settings.drain_timeout_s if timeout is None else timeout
        self.stopping.set()
        if self.heartbeat is not None and self.heartbeat.status == "ok":
            self.heartbeat.status = "draining"
            await self.heartbeat.beat()
        try:
            await asyncio.wait_for(self.on_drain(timeout), timeout + 1)
        except TimeoutError:
            self.log.warning("drain timed out", timeout=timeout)

    async def close(self) -> None:
        self.stopping.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.on_close()
        micro_svc, self.micro = self.micro, None
        if micro_svc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(micro_svc.stop(), 5)
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        METRICS.service_up.labels(self.name).set(0)
        await self.client.close()
        if tracing.TRACER is not None:
            await asyncio.to_thread(tracing.flush)  # spans of the last moments go out
        self.log.info("service stopped")

    async def stop(self) -> None:
        await self.drain()
        await self.close()
