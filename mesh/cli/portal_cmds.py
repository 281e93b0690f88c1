"""``mesh portal link --tenant T [--ttl 1h]``: a signed URL to one tenant's portal;
``mesh portal revoke LINK``: that link (and its sessions) stop working now."""

from __future__ import annotations

import sys
from datetime import timedelta

import typer

from mesh import portal
from mesh.cli._common import arun, connected, note, parse_duration, print_json, settings
from mesh.errors import ValidationError
from mesh.subjects import validate_name
from mesh.tenants import TenantStore

portal_app = typer.Typer(help="The endpoint-owner portal (a page on the API service).")


def register(app: typer.Typer) -> None:
    app.add_typer(portal_app, name="portal")


@portal_app.command("link")
def link_cmd(
    tenant: str = typer.Option("default", "--tenant", help="Whose portal the link opens."),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime: 15m, 1h, 2d (at most 7d)."),
    base_url: str | None = typer.Option(
        None,
        "--base-url",
        help="The API as the tenant's user reaches it (default: MESH_API_HOST:MESH_API_PORT).",
    ),
    as_json: bool = typer.Option(False, "--json", help="The URL with its tenant and expiry."),
) -> None:
    """Print a signed portal URL (stdout: the URL alone); hand it to the tenant's user."""
    validate_name(tenant, "tenant name")
    lifetime = parse_duration(ttl)
    if lifetime > portal.MAX_TTL:
        raise ValidationError(f"--ttl is at most {portal.MAX_TTL.days}d")
    if lifetime < timedelta(seconds=1):
        raise ValidationError("--ttl must be at least 1s")
    s = settings()

    async def check() -> None:
        async with connected(s) as c:
            store = await TenantStore.open(c.port, c.names.tenants, s.stream_replicas)
            await store.get(tenant)  # NotFound: one line, exit 1

    arun(check())
    if base_url is None:
        scheme = "https" if s.api_tls_cert else "http"
        host = "127.0.0.1" if s.api_host in ("0.0.0.0", "::", "") else s.api_host
        base_url = f"{scheme}://{host}:{s.api_port}"
    elif not base_url.startswith(("http://", "https://")):
        raise ValidationError(f"invalid --base-url {base_url!r}: use http(s)://host[:port]")
    key = portal.load_key_file(portal.key_path(s))
    token, claims = portal.issue_link(key, tenant, ttl=lifetime)
    url = portal.link_url(base_url, token)
    if as_json:
        print_json(
            {
                "url": url,
                "id": claims.jti,
                "tenant": claims.tenant,
                "expires_at": claims.expires_at.isoformat(),
            }
        )
        return
    sys.stdout.write(url + "\n")
    until = claims.expires_at.isoformat(timespec="seconds")
    note(f"portal link {claims.jti} for tenant {tenant}; it opens the portal until {until}")


@portal_app.command("revoke")
def revoke_cmd(
    link: str = typer.Argument(..., help="The link's URL, its token, or its id."),
    reason: str = typer.Option("", "--reason", help="Why (kept with the revocation)."),
) -> None:
    """Revoke a portal link before it expires: the page and its sessions refuse it."""
    from mesh.revocations import RevocationStore, check_reason, who

    portal.link_id(link)  # a bad argument: one line, before connecting
    check_reason(reason)
    s = settings()

    async def run() -> tuple[str, bool]:
        async with connected(s) as c:
            store = await RevocationStore.open(c.port, c.names.revoked, s.stream_replicas)
            return await portal.revoke_link(store, link, reason=reason, by=who())

    jti, new = arun(run())
    note(f"portal link {jti} revoked" if new else f"portal link {jti} was revoked already")
