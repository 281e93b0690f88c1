"""Event commands: publish, consume, request, tail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from mesh.cli._common import (
    arun,
    connected,
    err_console,
    parse_data,
    print_json,
)
from mesh.client import MeshClient
from mesh.envelope import JSON, Event
from mesh.errors import MeshError, ValidationError
from mesh.registry import EGRESS_KINDS
from mesh.subjects import qualify, validate_name


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
    app.command("consume")(consume)
    app.command("request")(request)
    app.command("tail")(tail)


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
            if t.kind in EGRESS_KINDS:
                raise ValidationError(
                    f"target {target!r} is a {t.kind} target: the egress delivers it"
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
    from mesh._nats.types import DeliverPolicy

    async def run() -> None:
        async with connected() as c:
            if source:
                validate_name(source, "source name")
            tenant = c.settings.tenant  # MESH_TENANT: that tenant's events only
            subj = (
                c.subjects.evt_filter(qualify(tenant, source))
                if source
                else c.subjects.evt_tenant(tenant)
            )
            if target:
                await c.target_or_error(target)
            sub = await c.port.subscribe_stream(subj, deliver_policy=DeliverPolicy.NEW)
            n = 0
            err_console.print(f"tailing {subj}" + (f" for target {target}" if target else ""))
            async for msg in sub.messages:
                try:
                    e = c.deliveries.decode(msg)
                except MeshError as exc:
                    err_console.print(f"undecodable message on {msg.subject}: {exc}", markup=False)
                    continue
                if target and await c.deliveries.check_event(target, e) is not None:
                    continue
                _print_event(e, as_json)
                n += 1
                if count is not None and n >= count:
                    break

    with contextlib.suppress(KeyboardInterrupt):
        arun(run())


__all__ = ["register"]
