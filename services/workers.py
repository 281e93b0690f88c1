"""Egress worker processes: ``mesh up --workers N|auto``, ``mesh serve webhook-egress --workers``.

The egress's consumers are durable pull consumers, so several processes fetching from
them share each target's backlog: the broker hands every message to one fetcher at a
time, and a message redelivers only when its ack wait runs out (at-least-once, as with
one process). The process that was asked to run is worker 0; it starts workers 1..N-1
as ``mesh serve webhook-egress`` subprocesses with ``MESH_WORKER_INDEX`` set (their
metrics textfiles are ``mesh-webhook-egress-wI.prom``, labelled ``mesh_worker``), and
stops them (SIGTERM: they drain) when it stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import structlog

from mesh.config import Settings
from mesh.errors import ConfigError

WORKER_ENV = "MESH_WORKER_INDEX"
STOP_TIMEOUT_S = 30.0

log = structlog.get_logger("mesh.workers")


def resolve_workers(spec: str, *, broker_local: bool, cores: int | None = None) -> int:
    """``auto``: one process per core, leaving one core to a broker on this machine."""
    cores = cores or os.cpu_count() or 1
    if spec == "auto":
        return max(1, cores - 1) if broker_local else cores
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--workers takes a whole number >= 1 or 'auto', not {spec!r}")
    return n


def workers_for(spec: str, settings: Settings) -> int:
    """``--workers SPEC`` for a process with these settings (the CLI's entry point)."""
    return resolve_workers(spec, broker_local=broker_is_local(settings))


def broker_is_local(settings: Settings) -> bool:
    if settings.embedded:
        return True
    hosts = {"127.0.0.1", "localhost", "[::1]", "::1"}
    for url in settings.servers:
        host = url.split("://", 1)[-1].rsplit("@", 1)[-1].rsplit(":", 1)[0]
        if host not in hosts:
            return False
    return True


def worker_index() -> int:
    try:
        return int(os.environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def worker_suffix() -> tuple[str, dict[str, str]]:
    """The textfile name suffix and label of this process when it is a worker > 0."""
    index = worker_index()
    if index <= 0:
        return "", {}
    return f"-w{index}", {"mesh_worker": str(index)}


class Workers:
    """Workers 1..N-1 of the egress as subprocesses of this one."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, nats_url: str) -> None:
        mesh = Path(sys.executable).with_name("mesh")
        cmd = [str(mesh)] if mesh.exists() else [sys.executable, "-m", "mesh.cli"]
        for index in range(1, self.count):
            env = {**os.environ, "MESH_NATS_URL": nats_url, WORKER_ENV: str(index)}
            self.procs.append(subprocess.Popen([*cmd, "serve", "webhook-egress"], env=env))
        if self.procs:
            log.info("egress workers started", workers=self.count, pids=[p.pid for p in self.procs])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
