"""Bridge commands: ``mesh token issue``."""

from __future__ import annotations

import sys

import typer

from mesh.cli._common import arun, connected, err_console, parse_duration, settings
from mesh.subjects import validate_name
from mesh.tokens import issue, key_path, load_key

token_app = typer.Typer(help="Credentials for the WebSocket bridge.")


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")


@token_app.command("issue")
def issue_cmd(
    target: str = typer.Option(..., "--target", help="The target the token opens."),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime: 30s, 15m, 1h, 7d."),
    publish_as: list[str] = typer.Option(
        [],
        "--publish-as",
        help="A source the holder may publish as (repeatable; default: the target itself).",
    ),
) -> None:
    """Print a signed bridge token for one target (stdout: the token alone)."""
    validate_name(target, "target name")
    for source in publish_as:
        validate_name(source, "source name")
    lifetime = parse_duration(ttl)
    s = settings()

    async def check() -> None:
        async with connected(s) as c:
            await c.target_or_error(target)

    arun(check())
    token = issue(load_key(key_path(s)), target, ttl=lifetime, publish_as=publish_as or None)
    sys.stdout.write(token + "\n")
    sources = ", ".join(publish_as or [target])
    err_console.print(
        f"token for target {target}, may publish as {sources}, valid for {ttl}", highlight=False
    )
