"""Core commands: up, serve, init, status, target, propagate, propagation, publish,
consume, request, tail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from mesh.cli._common import (
    arun,
    connected,
    console,
    err_console,
    parse_data,
    print_json,
    print_table,
    settings,
)
from mesh.client import MeshClient
from mesh.crypto import KeyRing
from mesh.envelope import JSON, Event
from mesh.errors import MeshError, NotFound, ValidationError
from mesh.observability import configure_logging
from mesh.registry import PropagationMode, RetryPolicy, Target, TargetKind
from mesh.subjects import validate_name

target_app = typer.Typer(help="Manage targets (webhook, nats and stream receivers).")
propagate_app = typer.Typer(help="Link a source to targets: choose a mode.")
propagation_app = typer.Typer(help="List and remove propagations.")


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("serve")(serve)
    app.command("init")(init)
    app.command("status")(status)
    app.add_typer(target_app, name="target")
    app.add_typer(propagate_app, name="propagate")
    app.add_typer(propagation_app, name="propagation")
    app.command("publish")(publish)
    app.command("consume")(consume)
    app.command("request")(request)
    app.command("tail")(tail)


# up / serve / init ------------------------------------------------------------


def up(
    services: str = typer.Option(
        "", "--services", help="Comma-separated subset: egress,bridge,health,sink (default all)."
    ),
) -> None:
    """Run the mesh: the embedded broker (unless MESH_NATS_URL is set) and every service."""
    from mesh.broker import EmbeddedBroker
    from services.runner import available_services, canonical, load_service, main_sync

    s = settings()
    configure_logging(s.log_format, s.log_level)
    names = (
        [canonical(n.strip()) for n in services.split(",") if n.strip()]
        if services
        else available_services()
    )
    for n in names:
        load_service(n)  # an unknown name fails here, before anything starts
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
    err_console.print("; ".join([*parts, "Ctrl-C stops"]), markup=False, soft_wrap=True)
    main_sync(names, s)


def serve(name: str = typer.Argument(..., help="webhook-egress | bridge | health | sink")) -> None:
    """Run one service in this process (connects to MESH_NATS_URL)."""
    from services.runner import load_service, main_sync

    s = settings()
    load_service(name)
    configure_logging(s.log_format, s.log_level)
    if s.embedded:
        s = s.model_copy(update={"nats_url": s.servers[0]})
    main_sync([name], s)


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
        store = await open_store(s.database_url)
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
            info = await c.js.stream_info(name)
            streams[name] = {"messages": info.state.messages, "bytes": info.state.bytes}
        except Exception:
            streams[name] = None
    dlq_depth: dict[str, int] = {}
    try:
        dlq_info = await c.js.stream_info(c.names.dlq, subjects_filter=c.subjects.dlq_all)
        for subj, n in (dlq_info.state.subjects or {}).items():
            dlq_depth[subj.rsplit(".", 1)[-1]] = n
    except Exception:
        pass
    targets = []
    for t in await c.registry.list_targets():
        row: dict[str, Any] = {"name": t.name, "kind": str(t.kind), "status": str(t.status)}
        try:
            ci = await c.js.consumer_info(c.names.events, t.consumer)
            row["pending"] = ci.num_pending
            row["unacked"] = ci.num_ack_pending
            row["lag"] = (ci.num_pending or 0) + (ci.num_ack_pending or 0)
            row["redelivered"] = ci.num_redelivered
            row["paused"] = bool(getattr(ci, "paused", False))
        except Exception:
            row["lag"] = None
        row["dlq"] = dlq_depth.get(t.name, 0)
        targets.append(row)
    return {
        "broker": {
            "url": str(c.nc.connected_url.geturl() if c.nc.connected_url else ""),
            "server_version": _version(c),
            "max_payload": c.nc.max_payload,
        },
        "streams": streams,
        "targets": targets,
        "propagations": len(await c.registry.list_propagations()),
    }


def _version(c: MeshClient) -> str:
    v = c.nc.connected_server_version
    return f"{v.major}.{v.minor}.{v.patch}"


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
    for name, info in st["streams"].items():
        console.print(f"stream  {name}: " + (f"{info['messages']} messages" if info else "missing"))
    print_table(
        "targets",
        ["name", "kind", "status", "lag", "unacked", "dlq"],
        [
            [t["name"], t["kind"], t["status"], t.get("lag"), t.get("unacked"), t["dlq"]]
            for t in st["targets"]
        ],
    )


# targets ----------------------------------------------------------------------


@target_app.command("add")
def target_add(
    name: str = typer.Argument(..., help="Target name: a-z, 0-9, '_' and '-'."),
    webhook: str | None = typer.Option(None, "--webhook", help="Deliver by HTTP POST to URL."),
    kind: TargetKind | None = typer.Option(
        None, "--kind", help="nats | stream (webhook: --webhook)"
    ),
    secret: str | None = typer.Option(None, "--secret", help="whsec_... (generated if omitted)"),
    timeout: float = typer.Option(30.0, "--timeout", help="Per-request timeout, seconds."),
    rate: float | None = typer.Option(None, "--rate", help="Max deliveries per second."),
    max_retries: int = typer.Option(5, "--max-retries"),
    max_in_flight: int = typer.Option(16, "--max-in-flight"),
    ordered: bool = typer.Option(False, "--ordered", help="Strict publish order, one in flight."),
    fmt: str = typer.Option("standard", "--format", help="standard | cloudevents"),
    retry_base: float = typer.Option(1.0, "--retry-base", help="First retry delay, seconds."),
    retry_max_delay: float = typer.Option(300.0, "--retry-max-delay"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a target."""
    validate_name(name, "target name")
    if webhook and kind not in (None, TargetKind.WEBHOOK):
        raise ValidationError("--webhook and --kind nats|stream exclude each other")
    if not webhook and kind in (None, TargetKind.WEBHOOK):
        raise ValidationError("give --webhook URL, or --kind nats|stream")
    if fmt not in ("standard", "cloudevents"):
        raise ValidationError("--format is standard or cloudevents")
    try:
        target = Target(
            name=name,
            kind=TargetKind.WEBHOOK if webhook else kind,  # type: ignore[arg-type]
            url=webhook,
            timeout_s=timeout,
            rate=rate,
            max_in_flight=max_in_flight,
            ordered=ordered,
            format=fmt,  # type: ignore[arg-type]
            retry=RetryPolicy(
                max_retries=max_retries, base_s=retry_base, max_delay_s=retry_max_delay
            ),
        )
    except Exception as exc:  # pydantic ValidationError: first problem, one line
        errs = getattr(exc, "errors", None)
        if errs:
            e = errs()[0]
            raise ValidationError(f"{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
        raise

    async def run() -> tuple[Target, list[str]]:
        async with connected() as c:
            t = await c.add_target(target, secret)
            return t, c.registry.secrets_for(t)

    t, secrets = arun(run())
    if as_json:
        doc = t.public()
        if secrets and not secret:
            doc["secret"] = secrets[0]
        print_json(doc)
        return
    console.print(f"target [bold]{t.name}[/] added ({t.kind})")  # names cannot hold markup
    if secrets and not secret:
        console.print(f"signing secret (shown once): {secrets[0]}")


@target_app.command("list")
def target_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List targets (secrets are never shown)."""

    async def run() -> list[Target]:
        async with connected() as c:
            return await c.registry.list_targets()

    targets = arun(run())
    if as_json:
        print_json([t.public() for t in targets])
        return
    print_table(
        "targets",
        ["name", "kind", "url", "status", "rate", "ordered", "retries", "timeout"],
        [
            [
                t.name,
                t.kind,
                t.url or "",
                t.status + (f" ({t.status_reason})" if t.status_reason else ""),
                t.rate or "",
                "yes" if t.ordered else "",
                t.retry.max_retries,
                f"{t.timeout_s:g}s",
            ]
            for t in targets
        ],
    )


@target_app.command("remove")
def target_remove(name: str) -> None:
    """Remove a target (and its part in propagations)."""

    async def run() -> list[str]:
        async with connected() as c:
            return await c.remove_target(name)

    removed = arun(run())
    console.print(
        f"target {name} removed"
        + (f"; propagations removed: {', '.join(removed)}" if removed else "")
    )


@target_app.command("enable")
def target_enable(name: str) -> None:
    """Re-enable a target that a 410 (or an operator) disabled."""
    from mesh.registry import TargetStatus

    async def run() -> None:
        async with connected() as c:
            await c.registry.set_status(name, TargetStatus.ACTIVE, None)

    arun(run())
    console.print(f"target {name} enabled")


@target_app.command("rotate-secret")
def target_rotate_secret(
    name: str,
    grace: str = typer.Option("24h", "--grace", help="How long the old secret keeps signing."),
) -> None:
    """New signing secret; old and new both sign during the grace period."""
    from mesh.cli._common import parse_duration

    period = parse_duration(grace)

    async def run() -> str:
        async with connected() as c:
            return await c.registry.rotate_secret(name, period)

    new = arun(run())
    console.print(f"new signing secret for {name} (shown once): {new}")
    console.print(f"the old secret also signs for {grace}")


# propagations -----------------------------------------------------------------


def _propagate(mode: PropagationMode, source: str, targets: list[str], types: str | None) -> None:
    async def run() -> Any:
        async with connected() as c:
            return await c.add_propagation(mode, source, targets, types)

    p = arun(run())
    console.print(f"propagation {p.id}: {p.mode} {escape(p.describe())}")


@propagate_app.command("unidirectional")
def propagate_uni(
    source: str = typer.Option(..., "--source"),
    target: str = typer.Option(..., "--target"),
    types: str | None = typer.Option(None, "--types", help="Event type pattern, e.g. order.*"),
) -> None:
    """Source -> one target."""
    _propagate(PropagationMode.UNIDIRECTIONAL, source, [target], types)


@propagate_app.command("bidirectional")
def propagate_bi(
    source: str = typer.Option(..., "--source"),
    target: str = typer.Option(..., "--target"),
    types: str | None = typer.Option(None, "--types"),
) -> None:
    """A <-> B: events both ways, request/reply both ways."""
    _propagate(PropagationMode.BIDIRECTIONAL, source, [target], types)


@propagate_app.command("multicast")
def propagate_multi(
    source: str = typer.Option(..., "--source"),
    target: list[str] = typer.Option(..., "--target", help="Repeat for each target."),
    types: str | None = typer.Option(None, "--types"),
) -> None:
    """Source -> a listed set of targets."""
    _propagate(PropagationMode.MULTICAST, source, target, types)


@propagate_app.command("broadcast")
def propagate_broad(
    source: str = typer.Option(..., "--source"),
    types: str | None = typer.Option(None, "--types"),
) -> None:
    """Source -> every target, including targets added later."""
    _propagate(PropagationMode.BROADCAST, source, [], types)


@propagation_app.command("list")
def propagation_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List propagations."""

    async def run() -> list[Any]:
        async with connected() as c:
            return await c.registry.list_propagations()

    props = arun(run())
    if as_json:
        print_json([p.model_dump(mode="json") for p in props])
        return
    print_table(
        "propagations",
        ["id", "mode", "route", "types"],
        [[p.id, p.mode, p.describe(), p.types or "*"] for p in props],
    )


@propagation_app.command("remove")
def propagation_remove(prop_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Remove a propagation; delivery along it stops at once."""

    async def run() -> Any:
        async with connected() as c:
            return await c.remove_propagation(prop_id)

    p = arun(run())
    console.print(f"propagation {p.id} removed ({escape(p.describe())})")


# publish / consume / request / tail --------------------------------------------


def publish(
    source: str = typer.Option(..., "--source"),
    event_type: str = typer.Option(..., "--type"),
    data: str | None = typer.Option(None, "--data", help="JSON, @file or - for stdin."),
    count: int = typer.Option(1, "--count", min=1, help="Publish N events (ids are unique)."),
    rate: float | None = typer.Option(None, "--rate", min=0.001, help="Events per second."),
    event_id: str | None = typer.Option(None, "--id", help="Event id (dedupe key)."),
    subject: str | None = typer.Option(None, "--subject", help="CloudEvents subject."),
    as_json_body: bool = typer.Option(
        False, "--json-body", help="Send data as application/json instead of msgpack."
    ),
) -> None:
    """Publish events as SOURCE."""
    payload = parse_data(data)
    validate_name(source, "source name")
    if event_id is not None and count > 1:
        raise ValidationError("--id and --count > 1 exclude each other (ids must be unique)")
    ctype = JSON if as_json_body else None

    async def run() -> list[str]:
        async with connected() as c:
            if count == 1:
                return [
                    await c.publish(
                        source,
                        event_type,
                        payload,
                        id=event_id,
                        subject=subject,
                        datacontenttype=ctype,
                    )
                ]
            return await _bulk(c, source, event_type, payload, count, rate, subject, ctype)

    ids = arun(run())
    if count == 1:
        print(ids[0])
    else:
        err_console.print(f"published {len(ids)} events")


async def _bulk(
    c: MeshClient,
    source: str,
    event_type: str,
    payload: Any,
    count: int,
    rate: float | None,
    subject: str | None,
    ctype: str | None,
) -> list[str]:
    ids: list[str] = []
    chunk = 1 if rate and rate < 50 else 200
    start = time.monotonic()
    with Progress(
        TextColumn("publishing"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err_console,
        transient=not sys.stderr.isatty(),
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("publish", total=count)
        done = 0
        while done < count:
            n = min(chunk, count - done)
            events = [
                c.build(source, event_type, payload, subject=subject, datacontenttype=ctype)
                for _ in range(n)
            ]
            await c.publish_many(events)
            ids.extend(e.id for e in events)
            done += n
            progress.update(task, completed=done)
            if rate:
                ahead = done / rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    return ids


def _event_doc(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "source": e.source,
        "type": e.type,
        "time": e.time.isoformat(),
        "seq": e.seq,
        "origin": e.effective_origin,
        "hops": e.hops,
        "replay": e.replay,
        "data": e.json_data(),
    }


def consume(
    target: str = typer.Option(..., "--target"),
    count: int | None = typer.Option(None, "--count", min=1, help="Stop after N events."),
    timeout: float = typer.Option(
        5.0, "--timeout", min=0.1, help="Stop after S seconds with no event."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Read a nats-kind target's feed; each event is acked after it is printed."""

    async def run() -> int:
        n = 0
        async with connected() as c:
            t = await c.target_or_error(target)
            if t.kind == TargetKind.WEBHOOK:
                raise ValidationError(
                    f"target {target!r} is a webhook target: the egress delivers it"
                )
            # The idle timeout stops the feed between fetches (never by cancelling one
            # mid-flight), and closing the feed hands unprinted events straight back.
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            idle = loop.call_later(timeout, stop.set)
            feed = c.consume(
                target, batch=min(count or 50, 50), expires=min(timeout, 1.0), stop=stop
            )
            try:
                async with contextlib.aclosing(feed):
                    async for d in feed:
                        idle.cancel()
                        _print_event(d.event, as_json)
                        await d.ack()
                        n += 1
                        if count is not None and n >= count:
                            break
                        idle = loop.call_later(timeout, stop.set)
            finally:
                idle.cancel()
        return n

    n = arun(run())
    if not as_json:
        err_console.print(f"{n} event(s) consumed")


def _print_event(e: Event, as_json: bool) -> None:
    doc = _event_doc(e)
    if as_json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
    else:
        sys.stdout.write(
            f"{doc['time']} {doc['source']} {doc['type']} {doc['id']}"
            f" {json.dumps(doc['data'], default=str)}\n"
        )
    sys.stdout.flush()


def request(
    source: str = typer.Option(..., "--source"),
    target: str = typer.Option(..., "--target"),
    event_type: str = typer.Option(..., "--type"),
    data: str | None = typer.Option(None, "--data"),
    timeout: float = typer.Option(5.0, "--timeout"),
) -> None:
    """Send a request along a bidirectional propagation and print the reply."""
    payload = parse_data(data)

    async def run() -> Any:
        async with connected() as c:
            return await c.request(source, target, event_type, payload, timeout=timeout)

    reply = arun(run())
    from mesh.envelope import to_jsonable

    print_json({"status": reply.status, "data": to_jsonable(reply.data)})
    if not reply.ok:
        raise typer.Exit(1)


def tail(
    source: str | None = typer.Option(None, "--source"),
    target: str | None = typer.Option(None, "--target"),
    count: int | None = typer.Option(None, "--count", help="Stop after N events."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Follow new events live (nothing is acked: tailing never disturbs delivery)."""
    from nats.js.api import DeliverPolicy

    from mesh import envelope

    async def run() -> None:
        async with connected() as c:
            subj = c.subjects.evt_filter(source) if source else c.subjects.evt_all
            if source:
                validate_name(source, "source name")
            if target:
                await c.target_or_error(target)
            sub = await c.js.subscribe(
                subj, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
            )
            n = 0
            err_console.print(f"tailing {subj}" + (f" for target {target}" if target else ""))
            async for msg in sub.messages:
                try:
                    e = envelope.decode(
                        msg.subject,
                        msg.headers,
                        msg.data,
                        c._keyring_or_none(),
                        seq=msg.metadata.sequence.stream,
                        subjects=c.subjects,
                    )
                except MeshError as exc:
                    err_console.print(f"undecodable message on {msg.subject}: {exc}", markup=False)
                    continue
                if target and await c.check_event(target, e) is not None:
                    continue
                _print_event(e, as_json)
                n += 1
                if count is not None and n >= count:
                    break

    with contextlib.suppress(KeyboardInterrupt):
        arun(run())


__all__ = ["NotFound", "register"]
