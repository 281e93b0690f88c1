"""Bridge commands: ``mesh token issue``, ``revoke``, ``list-revoked``."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import typer

from mesh.cli._common import (
    arun,
    connected,
    err_console,
    note,
    parse_duration,
    print_json,
    print_table,
    say,
    settings,
)
from mesh.cli._tables import Col
from mesh.errors import ValidationError
from mesh.revocations import Revocation, RevocationKind, RevocationStore, check_reason, who
from mesh.subjects import validate_name, validate_target_ref
from mesh.tokens import MAX_TTL, issue, key_path, load_key, validate_jti, verify

token_app = typer.Typer(help="Credentials for the WebSocket bridge.")


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")


@token_app.command("issue")
def issue_cmd(
    target: str = typer.Option(..., "--target", help="The target the token opens."),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime: 30s, 15m, 1h, 7d (at most 366d)."),
    publish_as: list[str] = typer.Option(
        [],
        "--publish-as",
        help="A source the holder may publish as (repeatable; default: the target itself).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the token with its id, target and times as JSON."
    ),
) -> None:
    """Print a signed bridge token for one target (stdout: the token alone; its id on stderr)."""
    validate_name(target, "target name")
    for source in publish_as:
        validate_name(source, "source name")
    lifetime = parse_duration(ttl)
    if lifetime > MAX_TTL:
        raise ValidationError(f"--ttl is at most {MAX_TTL.days}d: a token lives that long at most")
    s = settings()

    async def check() -> str:
        async with connected(s) as c:
            return (await c.target_or_error(target)).tenant

    tenant = arun(check())
    key = load_key(key_path(s))
    token = issue(key, target, ttl=lifetime, publish_as=publish_as or None, tenant=tenant)
    claims = verify(key, token, target)
    if as_json:
        print_json(
            {
                "token": token,
                "jti": claims.jti,
                "target": claims.target,
                "publish_as": list(claims.publish_as),
                "issued_at": claims.issued_at.isoformat(),
                "expires_at": claims.expires_at.isoformat(),
            }
        )
        return
    sys.stdout.write(token + "\n")
    sources = ", ".join(publish_as or [target])
    err_console.print(
        f"token {claims.jti} for target {target}, may publish as {sources}, valid for {ttl}",
        highlight=False,
    )


@token_app.command("revoke")
def revoke_cmd(
    jti: str | None = typer.Argument(
        None, metavar="JTI", help="The token's id (jti), printed by `mesh token issue`."
    ),
    target: str | None = typer.Option(
        None, "--target", help="With --all: the target whose tokens to revoke."
    ),
    all_tokens: bool = typer.Option(
        False, "--all", help="Revoke every token of --target issued before now."
    ),
    reason: str = typer.Option(
        "", "--reason", help="Why: kept with the revocation, logged, and sent to refused clients."
    ),
) -> None:
    """Revoke one bridge token, or every token of a target; bridges close their sessions."""
    if jti is not None and (target is not None or all_tokens):
        raise ValidationError("give a token id, or --target T --all, not both")
    if jti is None and target is None and not all_tokens:
        raise ValidationError("give the token id to revoke, or --target T --all")
    if jti is None and (target is None or not all_tokens):
        raise ValidationError(
            "--target needs --all" if target is not None else "--all needs --target T"
        )
    if jti is not None:
        validate_jti(jti)
    else:
        assert target is not None
        validate_target_ref(target)
    reason = check_reason(reason)
    s = settings()

    async def run() -> tuple[Revocation, bool]:
        async with connected(s) as c:
            store = await RevocationStore.open(c.port, c.names.revoked, s.stream_replicas)
            if jti is not None:
                return await store.revoke_token(jti, reason=reason, by=who())
            assert target is not None
            found = await c.target_or_error(target)  # a tenant's: ~T.name (or its own name)
            return await store.revoke_target(
                found.name, tenant=found.tenant, reason=reason, by=who()
            ), True

    rev, new = arun(run())
    if rev.kind == RevocationKind.TOKEN:
        say(f"token {rev.id} revoked" if new else f"token {rev.id} was revoked already")
    else:
        assert rev.not_before is not None
        before = _iso(rev.not_before, "milliseconds")
        say(f"every token of target {rev.target} issued before {before} revoked")
    if new:
        note(f"kept until {_iso(rev.kept_until)}; running bridges close the sessions it covers")


REVOKED_COLUMNS = [
    Col("kind", keep=0),
    Col("target or token id", keep=0, ident=True),
    Col("revoked", keep=1),
    Col("reason", keep=1, flex=True),
    Col("kept until", keep=2),
]


@token_app.command("list-revoked")
def list_revoked_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """Revocations still in force (each goes once the tokens it covers have expired)."""
    s = settings()

    async def run() -> list[Revocation]:
        async with connected(s) as c:
            store = await RevocationStore.open(c.port, c.names.revoked, s.stream_replicas)
            return await store.list()

    revs = arun(run())
    if as_json:
        print_json([r.model_dump(mode="json") for r in revs])
        return
    if not revs:
        say("no revoked tokens")
        return
    # A target's entry revokes what was issued before it was made: "revoked" says when.
    rows = [
        [str(r.kind), r.id, _iso(r.revoked_at), r.reason, r.kept_until.date().isoformat()]
        for r in revs
    ]
    print_table(
        "revoked bridge tokens",
        REVOKED_COLUMNS,
        rows,
    )


def _iso(t: datetime, timespec: str = "seconds") -> str:
    return t.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
