"""The MQTT driver's own deadline: aiomqtt's per-publish timeout is off (``math.inf``,
which spares a task and a timer per publish), so a PUBACK that never comes must still
end the send at the target's timeout, as a retry, with the connection dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("aiomqtt")

from mesh.registry import TargetKind
from services.egress.drivers.mqtt import MqttDriver
from tests.support.destinations import assert_timed_out_as_retries, mute_target, three_events

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
    target = mute_target(TargetKind.MQTT, silent_broker, topic="t/{type_path}")
    driver = MqttDriver(target, silent_broker)
    events = three_events()
    try:
        started = asyncio.get_running_loop().time()
        results = await driver.send_batch(events)
        single = await driver.send(events[0])
        took = asyncio.get_running_loop().time() - started
    finally:
        await driver.close()
    assert_timed_out_as_retries([*results, single], took)  # not aiomqtt's 10 s
