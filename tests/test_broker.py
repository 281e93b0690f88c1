"""The embedded nats-server and the runner that `mesh up` drives."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import nats
import pytest

from mesh.broker import EmbeddedBroker, find_nats_server, free_port, port_free
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import BrokerError, ConfigError, PortInUse
from services import runner


def test_the_wheel_ships_a_binary() -> None:
    assert Path(find_nats_server()).is_file()


async def test_start_serves_jetstream_and_stop_frees_the_port(tmp_path: Path) -> None:
    b = EmbeddedBroker(tmp_path / "nats", port=free_port())
    b.start()
    try:
        assert b.running
        b.start()  # a second start is a no-op
        nc = await nats.connect(b.url)
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()
        assert (tmp_path / "nats").is_dir()
    finally:
        b.stop()
    assert not b.running
    assert port_free("127.0.0.1", b.port)
    b.stop()  # twice is harmless


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        b = EmbeddedBroker(tmp_path / "nats", port=port)
        with pytest.raises(PortInUse) as info:
            b.start()
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg
    assert "MESH_NATS_PORT" in msg and "MESH_NATS_URL" in msg
    assert not b.running


async def test_max_payload_is_applied(tmp_path: Path) -> None:
    with EmbeddedBroker(tmp_path / "nats", port=free_port(), max_payload=4096) as b:
        nc = await nats.connect(b.url)
        try:
            assert nc.max_payload == 4096
        finally:
            await nc.close()


def test_kill_and_restart_on_the_same_store(tmp_path: Path) -> None:
    b = EmbeddedBroker(tmp_path / "nats", port=free_port(), log_file=tmp_path / "nats.log")
    b.start()
    b.kill()
    assert not b.running
    b.start()
    assert b.running
    b.stop()
    assert (tmp_path / "nats.log").read_text()


# The runner -----------------------------------------------------------------------


def up_settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        nats_port=free_port(),
        http_port=free_port(),
        bridge_port=free_port(),
        allow_private_targets=True,
    )


async def test_runner_starts_the_embedded_broker_and_stops(tmp_path: Path) -> None:
    s = up_settings(tmp_path)
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(runner.run([], s, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        # Streams exist: `mesh up` initialised the mesh.
        remote = s.model_copy(update={"nats_url": s.servers[0]})
        async with MeshClient(remote) as c:
            for name in (c.names.events, c.names.dlq, c.names.sys):
                await c.js.stream_info(name)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert port_free("127.0.0.1", s.nats_port)
    assert (s.home / "nats").is_dir()


async def test_runner_with_a_taken_port(tmp_path: Path) -> None:
    s = up_settings(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", s.nats_port))
        squatter.listen()
        with pytest.raises(PortInUse):
            await runner.run([], s, stop=asyncio.Event())


def test_unknown_service() -> None:
    with pytest.raises(ConfigError, match="unknown service 'nope'"):
        runner.load_service("nope")
    assert runner.canonical("egress") == "webhook-egress"
    for name in runner.available_services():
        assert runner.load_service(name).name


def test_one_broker_per_store(tmp_path: Path) -> None:
    """Two servers on one JetStream store would corrupt it: the second is refused."""
    first = EmbeddedBroker(tmp_path / "nats", port=free_port())
    first.start()
    try:
        second = EmbeddedBroker(tmp_path / "nats", port=free_port())
        with pytest.raises(BrokerError, match=r"another mesh .* runs an embedded nats-server"):
            second.start()
        assert not second.running
    finally:
        first.stop()
    # Once the first is gone, the store is free again.
    second.start()
    second.stop()
