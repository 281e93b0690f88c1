"""Run one or several services in one process, with an optional embedded broker.

``mesh up`` and ``mesh serve NAME`` both come here. SIGINT/SIGTERM drain every
service (in-flight work finishes or is handed back to the broker), then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
from pathlib import Path
from typing import Any

import structlog

from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.durability import SyncMode
from mesh.errors import ConfigError, MeshError
from mesh.observability import METRICS, write_textfile
from services.base import Service
from services.workers import Workers, worker_suffix
from services.workers import workers_for as workers_for  # the CLI resolves --workers here

# Service name -> "module:Class". `mesh up` runs those whose module exists.
SERVICES: dict[str, str] = {
    "sink": "services.sink:Sink",
    "webhook-egress": "services.egress:WebhookEgress",
    "bridge": "services.bridge:Bridge",
    "health": "services.health:Health",
    "api": "services.api:Api",
    "backup": "services.backup:Backup",
}
# Services `mesh up` runs only when configured: name -> the setting that turns it on.
OPT_IN = {"backup": "backup_every"}
ALIASES = {"egress": "webhook-egress"}
TEXTFILE_INTERVAL_S = 15.0

log = structlog.get_logger("mesh.runner")


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def load_service(name: str) -> type[Service]:
    name = canonical(name)
    if name not in SERVICES:
        raise ConfigError(f"unknown service {name!r}: choose from {', '.join(SERVICES)}")
    module_name, cls_name = SERVICES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(f"service {name!r} is not available in this build") from None
        raise
    cls: type[Service] = getattr(module, cls_name)
    return cls


def available_services(settings: Settings | None = None) -> list[str]:
    """Services this build has; an opt-in one only when ``settings`` turn it on."""
    out = []
    for name in SERVICES:
        if name in OPT_IN and not (settings and getattr(settings, OPT_IN[name])):
            continue
        try:
            load_service(name)
        except ConfigError:
            continue
        out.append(name)
    return out


def textfile_target(
    settings: Settings, names: list[str], embedded: bool
) -> tuple[Path, dict[str, str]]:
    """Where this process writes its metrics textfile, and the label that tells it apart.

    ``mesh up`` (everything in one process) writes ``mesh.prom``; a process
    running only some services (``mesh serve NAME``) writes ``mesh-NAME.prom``
    with ``mesh_process="NAME"`` on every sample, so several processes sharing
    one MESH_HOME never overwrite each other or repeat a series.
    """
    if embedded or not names:
        return settings.metrics_dir / "mesh.prom", {}
    label = "+".join(names)
    suffix, worker = worker_suffix()  # a worker > 0 of `--workers N`: a file of its own
    path = settings.metrics_dir / f"mesh-{'-'.join(names)}{suffix}.prom"
    return path, {"mesh_process": label, **worker}


async def _textfile_loop(path: Path, labels: dict[str, str]) -> None:
    while True:
        await asyncio.sleep(TEXTFILE_INTERVAL_S)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(write_textfile, path, METRICS.registry, labels)


async def run(
    names: list[str],
    settings: Settings,
    *,
    embedded: bool | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    workers: int = 1,
) -> None:
    """Start the broker (if embedded) and the services; block until a signal or ``stop``.

    ``workers`` > 1 with the egress among ``names``: workers - 1 more egress processes
    (services/workers.py), stopped before this process drains.
    """
    embedded = settings.embedded if embedded is None else embedded
    classes = [load_service(n) for n in names]
    textfile_path, textfile_labels = textfile_target(
        settings, [canonical(n) for n in names], embedded
    )
    broker: EmbeddedBroker | None = None
    if embedded:
        broker = EmbeddedBroker(
            settings.nats_store_dir,
            port=settings.nats_port,
            log_file=settings.home / "nats.log",
            sync=SyncMode(settings.broker_sync),
        )
        settings.home.mkdir(parents=True, exist_ok=True)
        await broker.astart()
        settings = settings.model_copy(update={"nats_url": broker.url})
        log.info(
            "embedded nats-server started",
            url=broker.url,
            store=str(settings.nats_store_dir),
            sync=str(broker.sync),
        )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    services: list[Service] = []
    textfile: asyncio.Task[Any] | None = None
    extra = Workers(workers if "webhook-egress" in [canonical(n) for n in names] else 1)
    try:
        async with MeshClient(settings, name="mesh-init") as c:
            await c.init()
        for cls in classes:
            svc = cls(settings)
            await svc.start()
            services.append(svc)
        extra.start(settings.nats_url or settings.servers[0])
        textfile = asyncio.create_task(_textfile_loop(textfile_path, textfile_labels))
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping", services=[s.name for s in services])
    finally:
        await asyncio.to_thread(extra.stop)
        await asyncio.gather(*(s.drain() for s in services), return_exceptions=True)
        await asyncio.gather(*(s.close() for s in services), return_exceptions=True)
        if textfile is not None:
            textfile.cancel()
        with contextlib.suppress(OSError):
            write_textfile(textfile_path, METRICS.registry, textfile_labels)
        if broker is not None:
            await broker.astop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def main_sync(names: list[str], settings: Settings, workers: int = 1) -> None:
    try:
        asyncio.run(run(names, settings, workers=workers))
    except KeyboardInterrupt:
        pass
    except MeshError:
        raise
