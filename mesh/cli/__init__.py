"""The ``mesh`` command.

Commands live in modules under ``mesh.cli``, each with a ``register(app)``
function. ``main`` turns every ``MeshError`` (and usage error) into one line on
stderr and a non-zero exit: 1 for errors, 2 for usage.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.2x vendors click; older releases depend on it
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc  # type: ignore[no-redef]

from mesh.errors import MeshError

# Exit and Abort live in typer.exceptions (vendored click) or click.exceptions (older typer).
ExitSignal: type[BaseException] = getattr(click_exc, "Exit", typer.Exit)
AbortSignal: type[BaseException] = getattr(click_exc, "Abort", typer.Abort)

app = typer.Typer(
    name="mesh",
    help="An event mesh on NATS JetStream: publish once, propagate to webhooks, NATS and WebSocket"
    " targets, keep every event.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _options(
    quiet: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="No warning on stderr when no mesh service is running (also MESH_QUIET=1).",
    ),
) -> None:
    from mesh.cli import _common

    _common.QUIET = quiet


COMMAND_MODULES = (
    "mesh.cli.core",
    "mesh.cli.registry_cmds",
    "mesh.cli.event_cmds",
    "mesh.cli.storage_cmds",
    "mesh.cli.replay_cmds",
    "mesh.cli.dlq_cmds",
    "mesh.cli.keys_cmds",
    "mesh.cli.bridge_cmds",
    "mesh.cli.apikey_cmds",
    "mesh.cli.portal_cmds",
    "mesh.cli.tenant_cmds",
    "mesh.cli.backup_cmds",
    "mesh.cli.trace_cmds",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


_register_all()


def fail(message: str, code: int = 1) -> None:
    print(f"mesh: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    import os

    from mesh.observability import configure_logging

    # Commands speak through their output; logs only for warnings unless asked.
    configure_logging("console", os.environ.get("MESH_LOG_LEVEL", "warning"))
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="mesh", standalone_mode=False)
    except MeshError as exc:
        fail(str(exc) or type(exc).__name__)
    except click_exc.NoArgsIsHelpError as exc:
        # click >= 8.2 raises this for a group called bare: the help is the answer.
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        raise SystemExit(2) from None
    except click_exc.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        fail(f"{exc.format_message()}{hint}", 2)
    except ExitSignal as exc:
        raise SystemExit(getattr(exc, "exit_code", 1)) from None
    except AbortSignal:
        fail("aborted", 130)
    except click_exc.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except OSError as exc:
        fail(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
    # Outside standalone mode, `raise typer.Exit(n)` comes back as the return value.
    if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
        raise SystemExit(rv)


__all__ = ["app", "main"]
