"""The ``mesh`` command run in this process (no ~1 s of imports per command), with its
own environment, terminal width and captured output, as a user's shell would run it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import threading

_LOCK = threading.Lock()  # stdout, stderr and the environment are process-wide
LOCK_WAIT_S = 90.0


class _ThisThread(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr while a command runs: what the command's
    thread writes goes to its buffer, what any other thread writes (a service the test
    runs in this process, logging) goes where it went before."""

    def __init__(self, buffer: io.StringIO, elsewhere: object) -> None:
        self._buffer = buffer
        self._elsewhere = elsewhere
        self._owner: int | None = threading.get_ident()

    def _target(self) -> io.StringIO:
        mine = threading.get_ident() == self._owner
        return self._buffer if mine else self._elsewhere  # type: ignore[return-value]

    def release(self) -> None:
        """The command is over: from now on everything goes elsewhere."""
        self._owner = None

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()

    def fileno(self) -> int:
        return self._target().fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target(), "encoding", None) or "utf-8"


def _run(
    env: dict[str, str], args: list[str], width: int, stdin: str | None
) -> subprocess.CompletedProcess[str]:
    from mesh.cli import _common, main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    # A command that hangs (its test timed out) holds the lock: the next ones fail with
    # this line instead of each waiting out its own timeout.
    if not _LOCK.acquire(timeout=LOCK_WAIT_S):
        raise RuntimeError(f"an in-process mesh command still runs after {LOCK_WAIT_S:.0f} s")
    try:
        saved_env = dict(os.environ)
        saved_widths = (_common.console.width, _common.err_console.width)
        saved_stdin = sys.stdin
        if stdin is not None:  # a pipe with this text, as `mesh ... < file` would read
            sys.stdin = io.StringIO(stdin)
        os.environ.clear()
        os.environ.update(env)
        _common.console.width = _common.err_console.width = width
        to_out, to_err = _ThisThread(out, sys.stdout), _ThisThread(err, sys.stderr)
        try:
            with contextlib.redirect_stdout(to_out), contextlib.redirect_stderr(to_err):
                try:
                    main(args)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
        finally:
            to_out.release()
            to_err.release()
            sys.stdin = saved_stdin
            os.environ.clear()
            os.environ.update(saved_env)
            _common.console.width, _common.err_console.width = saved_widths
            _common.QUIET = False
    finally:
        _LOCK.release()
    return subprocess.CompletedProcess(["mesh", *args], code, out.getvalue(), err.getvalue())


async def mesh_inproc(
    env: dict[str, str], *args: str, width: int = 80, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``mesh ARGS`` with ``env`` at ``width`` columns (and ``stdin`` as its input when
    given), on a worker thread (each command runs its own event loop)."""
    return await asyncio.to_thread(_run, env, list(args), width, stdin)
