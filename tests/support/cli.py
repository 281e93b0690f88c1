"""The ``mesh`` command against a test's mesh (in a subprocess, or in this process), and
checks on what it says."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from mesh.config import Settings
from tests.conftest import env_for
from tests.support.inproc import mesh_inproc

MESH = [sys.executable, "-m", "mesh.cli"]


async def mesh(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``mesh ARGS`` with ``env``, off the event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [*MESH, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run_cli(
    settings: Settings, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``mesh ARGS`` against the mesh of ``settings``, run in this process: a subprocess
    pays a second of imports (several under load) for what the command does and says.
    Where the process itself is the point (exit status of the interpreter, signals, a
    kill), use ``mesh``; tests/test_cli.py does."""
    return await mesh_inproc(env_for(settings), *args, stdin=stdin)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"rc={p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    return p


def one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback; returns the line."""
    out = p.stdout + p.stderr
    assert p.returncode != 0, f"expected failure, got 0\nstdout: {p.stdout}"
    assert "Traceback" not in out, out
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one line on stderr, got: {p.stderr!r}"
    line = lines[0]
    assert line.startswith("mesh: error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


async def assert_one_line_errors(
    settings: Settings, cases: list[tuple[list[str], str, int]]
) -> None:
    """Run every ``(args, expected text, exit code)`` at once; each must fail with that
    code and one error line holding the text."""
    procs = await asyncio.gather(*(run_cli(settings, *args) for args, _, _ in cases))
    for (args, expected, code), proc in zip(cases, procs, strict=True):
        line = one_line_error(proc)
        assert expected in line, (args, line)
        assert proc.returncode == code, (args, proc.returncode)
