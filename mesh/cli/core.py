"""Core commands: up, serve, init, status."""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import typer
from rich.markup import escape

from mesh.cli._circuits import circuit_states
from mesh.cli._common import (
    arun,
    connected,
    console,
    err_console,
    print_json,
    print_table,
    settings,
)
from mesh.cli._tables import Col
from mesh.client import MeshClient
from mesh.crypto import KeyRing
from mesh.durability import LAZY_WARNING, broker_sync
from mesh.errors import ConfigError, NotFound
from mesh.observability import configure_logging


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("serve")(serve)
    app.command("init")(init)
    app.command("status")(status)


# up / serve / init ------------------------------------------------------------


def _runner() -> Any:
    """``services.runner``, loaded by name: the library (``mesh/``) never imports the
    services (tests/test_layout.py); only these two commands reach them, at run time."""
    try:
        return importlib.import_module("services.runner")
    except ModuleNotFoundError as exc:
        if exc.name in ("services", "services.runner"):
            raise ConfigError("the mesh services are not installed with this library") from None
        raise


def up(
    services: str = typer.Option(
        "",
        "--services",
        help="Comma-separated subset: egress,bridge,health,sink,api (default all; backup"
        " too when MESH_BACKUP_EVERY is set).",
    ),
    workers: str = typer.Option(
        "1",
        "--workers",
        help="Egress processes: N, or auto (cores - 1 with a local broker, else cores).",
    ),
) -> None:
    """Run the mesh: the embedded broker (unless MESH_NATS_URL is set) and every service."""
    from mesh.broker import EmbeddedBroker

    runner = _runner()
    s = settings()
    n_workers = runner.workers_for(workers, s)
    configure_logging(s.log_format, s.log_level)
    names = (
        [runner.canonical(n.strip()) for n in services.split(",") if n.strip()]
        if services
        else runner.available_services(s)
    )
    for n in names:
        runner.load_service(n)  # an unknown name fails here, before anything starts
    if s.embedded:
        EmbeddedBroker(s.nats_store_dir, port=s.nats_port).check_port()
    s.home.mkdir(parents=True, exist_ok=True)
    KeyRing.load(s.key_path)
    where = "embedded nats-server on " + s.servers[0] if s.embedded else ", ".join(s.servers)
    parts = [f"mesh up: {where}", f"services: {', '.join(names) or 'none'}"]
    if "health" in names:
        parts.append(f"health http://127.0.0.1:{s.http_port}/")
    if "bridge" in names:
        parts.append(f"bridge ws://127.0.0.1:{s.bridge_port}/v1/stream")
    if "api" in names:
        scheme = "https" if s.api_tls_cert else "http"
        parts.append(f"api {scheme}://{s.api_host}:{s.api_port}/v1/docs")
    err_console.print("; ".join([*parts, "Ctrl-C stops"]), markup=False, soft_wrap=True)
    if s.embedded and s.broker_sync == "lazy":
        err_console.print(LAZY_WARNING, markup=False, soft_wrap=True)
    runner.main_sync(names, s, workers=n_workers)


def serve(
    name: str = typer.Argument(..., help="webhook-egress | bridge | health | sink | api | backup"),
    workers: str = typer.Option(
        "1",
        "--workers",
        help="webhook-egress only: N processes, or auto (cores - 1 with a local broker).",
    ),
) -> None:
    """Run one service in this process (connects to MESH_NATS_URL)."""
    runner = _runner()
    s = settings()
    runner.load_service(name)
    n_workers = runner.workers_for(workers, s)
    if n_workers > 1 and runner.canonical(name) != "webhook-egress":
        raise ConfigError("--workers applies to webhook-egress only")
    configure_logging(s.log_format, s.log_level)
    if s.embedded:
        s = s.model_copy(update={"nats_url": s.servers[0]})
    runner.main_sync([name], s, workers=n_workers)


async def _init() -> dict[str, Any]:
    s = settings()
    s.home.mkdir(parents=True, exist_ok=True)
    ring = KeyRing.load(s.key_path)
    async with connected(s) as c:
        consumers = await c.init()
    applied: list[int] | None = None
    try:
        from mesh.storage import open_store
    except ModuleNotFoundError:
        pass
    else:
        store = await open_store(s.db_url)
        try:
            applied = await store.migrate()
        finally:
            await store.close()
    return {
        "home": str(s.home),
        "key_file": str(s.key_path),
        "primary_key": ring.primary.id,
        "consumers": consumers,
        "migrations_applied": applied,
    }


def init(as_json: bool = typer.Option(False, "--json")) -> None:
    """Create the key file, streams, registry bucket, consumers and database schema."""
    result = arun(_init())
    if as_json:
        print_json(result)
        return
    console.print(f"home       {escape(result['home'])}")
    console.print(f"key file   {escape(result['key_file'])} (primary {result['primary_key']})")
    console.print(f"consumers  {len(result['consumers'])}")
    if result["migrations_applied"] is not None:
        console.print(f"migrations applied now: {result['migrations_applied'] or 'none needed'}")


# status -----------------------------------------------------------------------


async def gather_status(c: MeshClient) -> dict[str, Any]:
    """Broker, streams and per-target queue depth, read straight from JetStream."""
    streams: dict[str, dict[str, int] | None] = {}
    for name in (c.names.events, c.names.dlq, c.names.sys):
        try:
            info = await c.port.stream_info(name)
            streams[name] = {"messages": info.state.messages, "bytes": info.state.bytes}
        except Exception:
            streams[name] = None
    dlq_depth: dict[str, int] = {}
    with contextlib.suppress(Exception):
        dlq_depth = await c.deliveries.dlq_depths()
    targets = []
    listed = await c.registry.list_targets()
    for t in listed:
        row: dict[str, Any] = {"name": t.ref, "kind": str(t.kind), "status": str(t.status)}
        try:
            row.update(await c.deliveries.queue_depth(t))
        except Exception:
            row["lag"] = None
        row["dlq"] = dlq_depth.get(t.ref, 0)
        targets.append(row)
    circuits: dict[str, str | None] = {}
    with contextlib.suppress(Exception):
        circuits = await circuit_states(
            c, listed, {r["name"]: bool(r.get("paused")) for r in targets}
        )
    for row in targets:
        row["circuit"] = circuits.get(row["name"])
    return {
        "broker": {
            "url": c.port.connected_url,
            "server_version": _version(c),
            "max_payload": c.port.max_payload,
            "sync": await broker_sync(c.port, c.settings.nats_store_dir),
        },
        "streams": streams,
        "targets": targets,
        "propagations": len(await c.registry.list_propagations()),
    }


def _version(c: MeshClient) -> str:
    v = c.port.server_version
    return f"{v.major}.{v.minor}.{v.patch}"


STATUS_COLUMNS = [
    Col("name", keep=0),
    Col("kind", keep=1),
    Col("status", keep=1),
    Col("circuit", keep=0),
    Col("lag", keep=0),
    Col("unacked", keep=2),
    Col("dlq", keep=0),
]


def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Broker, streams, and each target's lag and dead letters."""

    async def run() -> dict[str, Any]:
        async with connected() as c:
            return await gather_status(c)

    st = arun(run())
    if as_json:
        print_json(st)
        return
    b = st["broker"]
    console.print(f"broker  {b['url']} (nats-server {b['server_version']})")
    console.print(f"sync    {b['sync']['mode']} ({b['sync']['source']})", markup=False)
    for name, info in st["streams"].items():
        console.print(f"stream  {name}: " + (f"{info['messages']} messages" if info else "missing"))
    print_table(
        "targets",
        STATUS_COLUMNS,
        [
            [
                t["name"],
                t["kind"],
                t["status"],
                t.get("circuit") or "-",
                "?" if t.get("lag") is None else t["lag"],
                "?" if t.get("unacked") is None else t["unacked"],
                t["dlq"],
            ]
            for t in st["targets"]
        ],
    )


__all__ = ["NotFound", "register"]
