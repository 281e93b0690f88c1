"""The MQTT driver's own deadline: aiomqtt's per-publish timeout is off (``math.inf``,
which spares a task and a timer per publish), so a PUBACK that never comes must still
end the send at the target's timeout, as a retry, with the connection dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("aiomqtt")

from mesh.destinations import DestinationOptions
from mesh.envelope import Event
from mesh.registry import Target, TargetKind
from services.egress.drivers.mqtt import MqttDriver

CONNACK = b"\x20\x03\x00\x00\x00"  # MQTT 5: session not present, success, no properties


@pytest.fixture
async def silent_broker() -> AsyncIterator[str]:
    """A broker that accepts the connection and every publish, and acknowledges none."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(CONNACK)
        while await reader.read(65536):
            pass  # PUBLISHes (and PINGREQs): never answered
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        server.close()


async def test_an_unacknowledged_publish_times_out_at_the_targets_timeout(
    silent_broker: str,
) -> None:
    target = Target(
        name="m",
        kind=TargetKind.MQTT,
        url=silent_broker,
        timeout_s=0.5,
        options=DestinationOptions(topic="t/{type_path}"),
    )
    driver = MqttDriver(target, silent_broker)
    events = [Event(source="shop", type="order.created", data={"n": i}) for i in range(3)]
    try:
        started = asyncio.get_running_loop().time()
        results = await driver.send_batch(events)
        single = await driver.send(events[0])
        took = asyncio.get_running_loop().time() - started
    finally:
        await driver.close()
    for result in [*results, single]:
        assert not result.ok and not result.permanent
        assert result.error == "timeout after 0.5s"
    assert took < 3.0  # two deadlines of 0.5 s (and a reconnect), not aiomqtt's 10 s
