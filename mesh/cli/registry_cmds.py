"""Registry commands: target, propagate, propagation."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from mesh.cli._common import (
    arun,
    connected,
    console,
    print_json,
    print_table,
    settings,
)
from mesh.cli._destinations import pick_destination
from mesh.cli._tables import Col
from mesh.errors import ValidationError
from mesh.registry import PropagationMode, RetryPolicy, Target, TargetKind
from mesh.subjects import validate_name
from mesh.tenants import TenantStore

target_app = typer.Typer(
    help="Manage targets (webhook, amqp, mqtt, redis, sqs, s3, kafka, nats and stream receivers)."
)
propagate_app = typer.Typer(help="Link a source to targets: choose a mode.")
propagation_app = typer.Typer(help="List and remove propagations.")


def register(app: typer.Typer) -> None:
    app.add_typer(target_app, name="target")
    app.add_typer(propagate_app, name="propagate")
    app.add_typer(propagation_app, name="propagation")


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
    amqp: str | None = typer.Option(
        None, "--amqp", help="Publish to RabbitMQ: amqp://USER:PASS@HOST/VHOST."
    ),
    exchange: str | None = typer.Option(None, "--exchange", help="amqp: exchange ('' default)."),
    routing_key: str | None = typer.Option(
        None, "--routing-key", help="amqp: routing-key template, default '{type}'."
    ),
    mqtt: str | None = typer.Option(None, "--mqtt", help="Publish over MQTT: mqtt://HOST:1883."),
    topic: str | None = typer.Option(
        None,
        "--topic",
        help="mqtt: topic template, default '{source}/{type_path}'; kafka: default '{source}'.",
    ),
    qos: int | None = typer.Option(None, "--qos", min=0, max=2, help="mqtt: QoS, default 1."),
    redis: str | None = typer.Option(
        None, "--redis", help="XADD to a Redis stream: redis://HOST:6379/0."
    ),
    stream: str | None = typer.Option(
        None, "--stream", help="redis: stream-key template, default 'mesh:{source}'."
    ),
    maxlen: int | None = typer.Option(None, "--maxlen", min=1, help="redis: MAXLEN ~ N."),
    sqs: str | None = typer.Option(None, "--sqs", help="Send to the SQS queue URL."),
    group_id: str | None = typer.Option(
        None, "--group-id", help="sqs FIFO: MessageGroupId template, default '{source}'."
    ),
    s3: str | None = typer.Option(None, "--s3", help="One object per event: s3://BUCKET/PREFIX."),
    key: str | None = typer.Option(
        None,
        "--key",
        help="s3: object-key template, default '{source}/{type_path}/{id}.json'; "
        "kafka: record-key template (one key keeps its order), default '{source}', '' none.",
    ),
    kafka: str | None = typer.Option(
        None, "--kafka", help="Produce to Kafka: kafka[s]://[USER:PASS@]HOST:9092[?mechanism=M]."
    ),
    endpoint_url: str | None = typer.Option(
        None, "--endpoint-url", help="sqs/s3: a compatible endpoint (MinIO...)."
    ),
    region: str | None = typer.Option(None, "--region", help="sqs/s3: AWS region."),
    transform: str | None = typer.Option(
        None, "--transform", help="JMESPath reshaping the data delivered to this target."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a target (in tenant MESH_TENANT, default 'default')."""
    validate_name(name, "target name")
    tenant = settings().tenant
    dest = pick_destination(
        {
            "webhook": webhook,
            "amqp": amqp,
            "mqtt": mqtt,
            "redis": redis,
            "sqs": sqs,
            "s3": s3,
            "kafka": kafka,
        },
        {
            "exchange": exchange,
            "routing_key": routing_key,
            "topic": topic,
            "qos": qos,
            "stream": stream,
            "maxlen": maxlen,
            "group_id": group_id,
            "key": key,
            "endpoint_url": endpoint_url,
            "region": region,
        },
    )
    url = dest[1] if dest else None
    if dest and kind is not None and kind != dest[0]:
        raise ValidationError(f"--{dest[0]} and --kind {kind} exclude each other")
    if not dest and kind in (None, TargetKind.WEBHOOK):
        raise ValidationError(
            "give a destination (--webhook, --amqp, --mqtt, --redis, --sqs, --s3, --kafka URL) "
            "or --kind nats|stream"
        )
    if fmt not in ("standard", "cloudevents"):
        raise ValidationError("--format is standard or cloudevents")
    if secret is not None and dest and dest[0] != "webhook":
        raise ValidationError("--secret is for --webhook targets")
    try:
        target = Target(
            name=name,
            kind=TargetKind(dest[0]) if dest else kind,  # type: ignore[arg-type]
            url=url,
            options=dest[2] if dest and dest[0] != "webhook" else None,
            timeout_s=timeout,
            rate=rate,
            max_in_flight=max_in_flight,
            ordered=ordered,
            format=fmt,  # type: ignore[arg-type]
            transform=transform,
            tenant=tenant,
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
            if tenant != "default":
                await (await TenantStore.open(c.port, c.names.tenants)).get(tenant)
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


TARGET_COLUMNS = [
    Col("name", keep=0),
    Col("kind", keep=0),
    Col("url", keep=1, flex=True),
    Col("status", keep=0, flex=True),
    Col("rate", keep=3),
    Col("ordered", keep=3),
    Col("retries", keep=2),
    Col("timeout", keep=2),
]


@target_app.command("list")
def target_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List targets (secrets are never shown)."""

    async def run() -> list[Target]:
        async with connected() as c:
            targets = await c.registry.list_targets()
            tenant = c.settings.tenant  # MESH_TENANT: its own targets; default: all
            return [t for t in targets if tenant == "default" or t.tenant == tenant]

    targets = arun(run())
    if as_json:
        print_json([t.public() for t in targets])
        return
    print_table(
        "targets",
        TARGET_COLUMNS,
        [
            [
                t.ref,  # a tenant's target: ~tenant.name
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
            ref = (await c.target_or_error(name)).ref  # MESH_TENANT's target of that name
            await c.registry.set_status(ref, TargetStatus.ACTIVE, None)

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
            ref = (await c.target_or_error(name)).ref  # MESH_TENANT's target of that name
            return await c.registry.rotate_secret(ref, period)

    new = arun(run())
    console.print(f"new signing secret for {name} (shown once): {new}")
    console.print(f"the old secret also signs for {grace}")


# propagations -----------------------------------------------------------------


FILTER_HELP = 'CloudEvents SQL over attributes and data, e.g. "data.total > 100".'
TRANSFORM_HELP = 'JMESPath reshaping the delivered data, e.g. "{id: order.id}".'


def _propagate(
    mode: PropagationMode,
    source: str,
    targets: list[str],
    types: str | None,
    filter: str | None,
    transform: str | None,
) -> None:
    async def run() -> Any:
        async with connected() as c:
            return await c.add_propagation(
                mode, source, targets, types, filter=filter, transform=transform
            )

    p = arun(run())
    console.print(f"propagation {p.id}: {p.mode} {escape(p.describe())}")
    if p.filter:
        console.print(f"  filter: {escape(p.filter)}")
    if p.transform:
        console.print(f"  transform: {escape(p.transform)}")


@propagate_app.command("unidirectional")
def propagate_uni(
    source: str = typer.Option(..., "--source"),
    target: str = typer.Option(..., "--target"),
    types: str | None = typer.Option(None, "--types", help="Event type pattern, e.g. order.*"),
    filter: str | None = typer.Option(None, "--filter", help=FILTER_HELP),
    transform: str | None = typer.Option(None, "--transform", help=TRANSFORM_HELP),
) -> None:
    """Source -> one target."""
    _propagate(PropagationMode.UNIDIRECTIONAL, source, [target], types, filter, transform)


@propagate_app.command("bidirectional")
def propagate_bi(
    source: str = typer.Option(..., "--source"),
    target: str = typer.Option(..., "--target"),
    types: str | None = typer.Option(None, "--types"),
    filter: str | None = typer.Option(None, "--filter", help=FILTER_HELP),
    transform: str | None = typer.Option(None, "--transform", help=TRANSFORM_HELP),
) -> None:
    """A <-> B: events both ways, request/reply both ways."""
    _propagate(PropagationMode.BIDIRECTIONAL, source, [target], types, filter, transform)


@propagate_app.command("multicast")
def propagate_multi(
    source: str = typer.Option(..., "--source"),
    target: list[str] = typer.Option(..., "--target", help="Repeat for each target."),
    types: str | None = typer.Option(None, "--types"),
    filter: str | None = typer.Option(None, "--filter", help=FILTER_HELP),
    transform: str | None = typer.Option(None, "--transform", help=TRANSFORM_HELP),
) -> None:
    """Source -> a listed set of targets."""
    _propagate(PropagationMode.MULTICAST, source, target, types, filter, transform)


@propagate_app.command("broadcast")
def propagate_broad(
    source: str = typer.Option(..., "--source"),
    types: str | None = typer.Option(None, "--types"),
    filter: str | None = typer.Option(None, "--filter", help=FILTER_HELP),
    transform: str | None = typer.Option(None, "--transform", help=TRANSFORM_HELP),
) -> None:
    """Source -> every target, including targets added later."""
    _propagate(PropagationMode.BROADCAST, source, [], types, filter, transform)


PROPAGATION_COLUMNS = [
    Col("id", keep=0, ident=True),
    Col("mode", keep=0),
    Col("route", keep=0, flex=True),
    Col("types", keep=1, flex=True),
    Col("filter", keep=1, flex=True),
    Col("transform", keep=2, flex=True),
]


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
        PROPAGATION_COLUMNS,
        [
            [p.id, p.mode, p.describe(), p.types or "*", p.filter or "", p.transform or ""]
            for p in props
        ],
    )


@propagation_app.command("remove")
def propagation_remove(prop_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Remove a propagation; delivery along it stops at once."""

    async def run() -> Any:
        async with connected() as c:
            return await c.remove_propagation(prop_id)

    p = arun(run())
    console.print(f"propagation {p.id} removed ({escape(p.describe())})")


__all__ = ["register"]
