"""API keys for the HTTP API: ``mesh apikey create|list|revoke``."""

from __future__ import annotations

import sys

import typer

from mesh.apikeys import ApiKey, ApiKeyStore, Scope
from mesh.cli._common import arun, connected, note, parse_duration, print_json, print_table, say
from mesh.cli._tables import Col
from mesh.revocations import who
from mesh.tenants import TenantStore

apikey_app = typer.Typer(help="Keys for the HTTP API (stored hashed; shown once).")


def register(app: typer.Typer) -> None:
    app.add_typer(apikey_app, name="apikey")


@apikey_app.command("create")
def apikey_create(
    name: str = typer.Option(..., "--name", help="What the key is for (shown in listings)."),
    scope: Scope = typer.Option(..., "--scope", help="read | publish | admin"),
    expires: str | None = typer.Option(
        None, "--expires", help="Lifetime, e.g. 90d (default: none)"
    ),
    rate: float | None = typer.Option(
        None, "--rate", help="Requests/s allowed (default MESH_API_RATE)"
    ),
    tenant: str | None = typer.Option(
        None, "--tenant", help="Scope the key to one tenant (default: an operator key, all)"
    ),
    as_json: bool = typer.Option(False, "--json", help="The key and its record as JSON."),
) -> None:
    """Create a key and print it once (stdout: the key alone); it cannot be shown again."""
    ttl = parse_duration(expires) if expires else None

    async def run() -> tuple[ApiKey, str]:
        async with connected() as c:
            if tenant is not None:
                tenants = await TenantStore.open(
                    c.port, c.names.tenants, c.settings.stream_replicas
                )
                await tenants.get(tenant)  # an unknown tenant: a clear error, no key
            store = await ApiKeyStore.open(c.port, c.names.apikeys, c.settings.stream_replicas)
            return await store.create(name, scope, ttl=ttl, rate=rate, by=who(), tenant=tenant)

    record, key = arun(run())
    if as_json:
        print_json({**record.public(), "key": key})
        return
    sys.stdout.write(key + "\n")
    until = record.expires_at.isoformat(timespec="seconds") if record.expires_at else "never"
    whose = f"tenant {record.tenant}" if record.tenant else "operator"
    note(f"API key {record.id} ({record.scope}, {whose}) created; expires {until}")
    note("it is shown once: keep it")


@apikey_app.command("list")
def apikey_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List keys (ids, names, scopes, states; never the keys)."""

    async def run() -> list[ApiKey]:
        async with connected() as c:
            store = await ApiKeyStore.open(c.port, c.names.apikeys, c.settings.stream_replicas)
            return await store.list()

    keys = arun(run())
    if as_json:
        print_json([k.public() for k in keys])
        return
    if not keys:
        say("no API keys")
        return
    print_table(
        "API keys",
        [
            Col("id", keep=0),  # 12 hex digits, taken whole by `mesh apikey revoke`
            Col("name", keep=1, flex=True),
            Col("scope", keep=0),
            Col("tenant", keep=1),
            Col("state", keep=0),
            Col("created", keep=2),
            Col("expires", keep=1),
        ],
        [
            [
                k.id,
                k.name,
                k.scope,
                k.tenant or "(operator)",
                k.state(),
                k.created_at.isoformat(timespec="seconds"),
                k.expires_at.isoformat(timespec="seconds") if k.expires_at else "never",
            ]
            for k in keys
        ],
    )


@apikey_app.command("revoke")
def apikey_revoke(key_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Revoke a key by its id; the API refuses it within seconds."""

    async def run() -> tuple[ApiKey, bool]:
        async with connected() as c:
            store = await ApiKeyStore.open(c.port, c.names.apikeys, c.settings.stream_replicas)
            return await store.revoke(key_id)

    record, new = arun(run())
    say(f"API key {record.id} revoked" if new else f"API key {record.id} was revoked already")
