"""Tenants: ``mesh tenant create|list|delete|quota|nats-accounts`` (mesh/tenants.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from mesh.apikeys import ApiKeyStore
from mesh.cli._common import arun, connected, print_json, print_table, say
from mesh.cli._tables import Col
from mesh.errors import ValidationError
from mesh.nats_accounts import TenantAccount, accounts_block, render
from mesh.registry_models import EGRESS_KINDS
from mesh.tenants import Quotas, Tenant, TenantStore, delete_empty

tenant_app = typer.Typer(help="Tenants: each sees only its own targets, keys and events.")

_UNSET = "unset"


def register(app: typer.Typer) -> None:
    app.add_typer(tenant_app, name="tenant")


def _quota_value(text: str | None, what: str, kind: type[float] | type[int]) -> object:
    """None: not given; ``unset``: remove the quota (stored as None); else a number."""
    if text is None:
        return ...
    if text == _UNSET:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValidationError(f"{what} takes a number or 'unset', not {text!r}") from None


def _quota_changes(events: str | None, targets: str | None, days: str | None) -> dict[str, object]:
    given = {
        "events_per_s": _quota_value(events, "--events-per-s", float),
        "max_targets": _quota_value(targets, "--max-targets", int),
        "stored_days": _quota_value(days, "--stored-days", int),
    }
    changes = {k: v for k, v in given.items() if v is not ...}
    Quotas.model_validate({k: v for k, v in changes.items() if v is not None})
    return changes


_EVENTS = typer.Option(None, "--events-per-s", help="Events/s published ('unset': no limit)")
_TARGETS = typer.Option(None, "--max-targets", help="Targets held ('unset': no limit)")
_DAYS = typer.Option(None, "--stored-days", help="Days the sink keeps events ('unset': default)")


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@tenant_app.command("create")
def tenant_create(
    name: str = typer.Argument(..., metavar="NAME"),
    events: str | None = _EVENTS,
    targets: str | None = _TARGETS,
    days: str | None = _DAYS,
) -> None:
    """Create a tenant (a service-name-like name), optionally with quotas."""
    quotas = Quotas.model_validate(
        {k: v for k, v in _quota_changes(events, targets, days).items() if v is not None}
    )

    async def run() -> Tenant:
        async with connected() as c:
            store = await TenantStore.open(c.port, c.names.tenants, c.settings.stream_replicas)
            return await store.create(name, quotas)

    tenant = arun(run())
    say(f"tenant {tenant.name} created")


@tenant_app.command("list")
def tenant_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List tenants and their quotas ('-': unlimited); 'default' always exists."""

    async def run() -> list[Tenant]:
        async with connected() as c:
            store = await TenantStore.open(c.port, c.names.tenants, c.settings.stream_replicas)
            return await store.list()

    tenants = arun(run())
    if as_json:
        print_json([t.model_dump(mode="json") for t in tenants])
        return
    print_table(
        "tenants",
        [
            Col("name", keep=0, flex=True),
            Col("events/s", keep=1),
            Col("max targets", keep=1),
            Col("stored days", keep=1),
        ],
        [
            [
                t.name,
                _fmt(t.quotas.events_per_s),
                _fmt(t.quotas.max_targets),
                _fmt(t.quotas.stored_days),
            ]
            for t in tenants
        ],
    )


@tenant_app.command("quota")
def tenant_quota(
    name: str = typer.Argument(..., metavar="NAME"),
    events: str | None = _EVENTS,
    targets: str | None = _TARGETS,
    days: str | None = _DAYS,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show a tenant's quotas, or change those given ('unset' removes one)."""
    changes = _quota_changes(events, targets, days)

    async def run() -> Tenant:
        async with connected() as c:
            store = await TenantStore.open(c.port, c.names.tenants, c.settings.stream_replicas)
            if not changes:
                return await store.get(name)
            return await store.set_quotas(name, **changes)  # type: ignore[arg-type]

    tenant = arun(run())
    if as_json:
        print_json(tenant.model_dump(mode="json"))
        return
    q = tenant.quotas
    say(
        f"tenant {tenant.name}: events/s {_fmt(q.events_per_s)}, max targets"
        f" {_fmt(q.max_targets)}, stored days {_fmt(q.stored_days)}"
    )


@tenant_app.command("delete")
def tenant_delete(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Delete a tenant that holds no targets, propagations or live API keys any more."""

    async def run() -> None:
        async with connected() as c:
            store = await TenantStore.open(c.port, c.names.tenants, c.settings.stream_replicas)
            keys = await ApiKeyStore.open(c.port, c.names.apikeys, c.settings.stream_replicas)
            await delete_empty(store, c.registry, keys, name)

    arun(run())
    say(f"tenant {name} deleted")


@tenant_app.command("nats-accounts")
def tenant_nats_accounts(
    out: Path | None = typer.Option(None, "--out", help="Write here (default: stdout)"),
) -> None:
    """Print nats.conf's accounts block: one NATS account per tenant for its raw clients
    (docs/ARCHITECTURE.md, NATS accounts). Passwords are $MESH_NATS_PASSWORD[_<TENANT>]."""

    async def run() -> tuple[str, int]:
        async with connected() as c:
            store = await TenantStore.open(c.port, c.names.tenants, c.settings.stream_replicas)
            tenants = [t.name for t in await store.list() if t.name != "default"]
            targets = await c.registry.list_targets()
            accounts = [
                TenantAccount(
                    name,
                    tuple(
                        t.consumer
                        for t in targets
                        if t.tenant == name and t.kind not in EGRESS_KINDS
                    ),
                )
                for name in tenants
            ]
            block = accounts_block(
                c.settings.prefix,
                c.names.events,
                accounts,
                mesh_user=c.settings.nats_user or "mesh",
            )
            return render(block), len(accounts)

    text, count = arun(run())
    if out is None:
        print(text, end="")
        return
    out.write_text(text, encoding="utf-8")
    say(f"nats accounts for {count} tenant(s) written to {out}")
