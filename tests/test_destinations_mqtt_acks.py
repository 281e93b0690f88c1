"""The MQTT driver's own publish path (paho without aiomqtt's ``publish``): an event is
delivered only once its PUBACK came with a success reason code; a refusal is a failure
(permanent or a retry by its code); a lost connection fails the pending publishes at
once; a batch larger than the socket's buffer is written in full.

Real Mosquitto where it can answer (its ACL refuses a topic with 0x87), a scripted
broker where it cannot (quota exceeded, a connection cut after the PUBLISHes)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

pytest.importorskip("aiomqtt")

from mesh.destinations import DestinationOptions
from mesh.envelope import Event
from mesh.registry import Target, TargetKind
from services.egress.drivers.mqtt import MqttDriver
from tests.support.destinations import server_url

CONNACK = b"\x20\x03\x00\x00\x00"  # MQTT 5: session not present, success, no properties
PUBLISH = 0x30


def target(url: str, topic: str, timeout_s: float = 5.0, **kw: object) -> Target:
    return Target(
        name="acks",
        kind=TargetKind.MQTT,
        url=url,
        timeout_s=timeout_s,
        options=DestinationOptions(topic=topic, **kw),  # type: ignore[arg-type]
    )


def events(n: int, pad: int = 0) -> list[Event]:
    return [
        Event(source="shop", type="order.created", data={"n": i, "pad": "x" * pad})
        for i in range(n)
    ]


# A Mosquitto of the test's own, with an ACL -----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def acl_broker(tmp_path: Path) -> AsyncIterator[str]:
    """Mosquitto that lets anyone publish under ``allowed/`` and nowhere else."""
    binary = shutil.which("mosquitto")
    if binary is None:
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    port = free_port()
    (tmp_path / "acl").write_text("topic write allowed/#\n")
    (tmp_path / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"acl_file {tmp_path / 'acl'}\npersistence false\n"
        # As root, Mosquitto would drop to its own user, which cannot read tmp_path.
        f"user {getpass.getuser()}\n"
    )
    proc = subprocess.Popen(
        [binary, "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert proc.poll() is None, "mosquitto exited"
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_a_publish_the_broker_refuses_is_a_permanent_failure(acl_broker: str) -> None:
    denied = MqttDriver(target(acl_broker, "denied/{type_path}"), acl_broker)
    allowed = MqttDriver(target(acl_broker, "allowed/{type_path}"), acl_broker)
    try:
        refused = [*await denied.send_batch(events(3)), await denied.send(events(1)[0])]
        taken = [*await allowed.send_batch(events(3)), await allowed.send(events(1)[0])]
    finally:
        await denied.close()
        await allowed.close()
    for result in refused:  # aiomqtt alone counted these as delivered
        assert not result.ok and result.permanent
        assert "0x87" in (result.error or "") and "Not authorized" in (result.error or "")
    assert all(result.ok for result in taken)


# The machine's Mosquitto ---------------------------------------------------------------


async def test_a_batch_larger_than_the_socket_buffer_is_written_in_full() -> None:
    url = server_url("mqtt")
    driver = MqttDriver(target(url, "mesh-test-big/{type_path}", timeout_s=20), url)
    try:
        results = await driver.send_batch(events(24, pad=256 * 1024))  # 6 MB in one batch
        assert driver._paho is not None and not driver._paho.want_write()
    finally:
        await driver.close()
    assert [r.ok for r in results] == [True] * 24, [r.error for r in results if not r.ok]


async def test_qos_0_is_delivered_once_written() -> None:
    url = server_url("mqtt")
    driver = MqttDriver(target(url, "mesh-test-q0/{type_path}", qos=0), url)
    try:
        results = [*await driver.send_batch(events(5)), await driver.send(events(1)[0])]
    finally:
        await driver.close()
    assert all(r.ok for r in results)


async def test_aiomqtt_keeps_its_paho_client_where_the_driver_takes_it() -> None:
    import aiomqtt
    import paho.mqtt.client as paho

    # The driver reaches paho through aiomqtt's ``_client`` (services/egress/drivers/mqtt.py).
    assert isinstance(aiomqtt.Client("127.0.0.1")._client, paho.Client)


# A scripted broker -----------------------------------------------------------------------


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readexactly(1))[0]
    size, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return head, await reader.readexactly(size)


def packet_id(body: bytes) -> bytes:
    """A QoS 1 PUBLISH's packet id: after the topic (two bytes of length, then it)."""
    topic_len = int.from_bytes(body[:2], "big")
    return body[2 + topic_len : 4 + topic_len]


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_packet(reader)  # CONNECT
            writer.write(CONNACK)
            await script(reader, writer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_quota_exceeded_is_a_retry_on_the_same_connection() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_packet(reader)
            if head & 0xF0 == PUBLISH:
                writer.write(b"\x40\x03" + packet_id(body) + b"\x97")  # quota exceeded

    async with scripted(refuse) as url:
        driver = MqttDriver(target(url, "t/{type_path}"), url)
        try:
            results = await driver.send_batch(events(4))
            generation = driver.generation
            single = await driver.send(events(1)[0])
            assert driver.connected and driver.generation == generation  # not dropped
        finally:
            await driver.close()
    for result in [*results, single]:
        assert not result.ok and not result.permanent
        assert "0x97" in (result.error or "")


async def test_a_lost_connection_fails_the_pending_publishes_at_once() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_packet(reader)
        assert head & 0xF0 == PUBLISH
        writer.transport.abort()  # no PUBACK: the connection goes instead

    async with scripted(cut) as url:
        driver = MqttDriver(target(url, "t/{type_path}", timeout_s=10.0), url)
        try:
            started = time.monotonic()
            results = await driver.send_batch(events(4))
            took = time.monotonic() - started
        finally:
            await driver.close()
    for result in results:
        assert not result.ok and not result.permanent
        assert "timeout" not in (result.error or ""), result.error
    assert took < 5.0  # well before the target's 10 s deadline
    assert not driver.connected
