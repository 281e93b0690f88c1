"""One NATS account per tenant for its raw clients (mesh/nats_accounts.py, issue #17).

A real nats-server runs with the block ``mesh tenant nats-accounts`` writes, reloaded
after the tenants and their targets exist (the deployment's own order). The mesh runs in
the MESH account; each tenant's raw nats.py client, in its own account, publishes and
subscribes with the default tenant's subjects, pulls and acks its own target's consumer,
and reaches nothing of another tenant's nor the mesh's JetStream API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.js.errors import ServiceUnavailableError

from mesh.broker import find_nats_server, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import ValidationError
from mesh.nats_accounts import TenantAccount, accounts_block, password_var, render
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.tenants import TenantStore
from tests.conftest import env_for
from tests.support.cli import mesh_inproc, ok

PASSWORDS = {
    "MESH_NATS_PASSWORD": "pw-mesh",
    **{password_var(t): f"pw-{t}" for t in ("acme", "zeta")},
}


def test_block_exports_each_tenants_own_subjects_and_consumers_only() -> None:
    block = accounts_block(
        "mesh",
        "MESH_EVENTS",
        [TenantAccount("acme", ("deliver-a",)), TenantAccount("zeta-co")],
        mesh_user="svc",
    )
    assert set(block) == {"MESH", "T_ACME", "T_ZETA_CO"}
    assert block["MESH"]["users"] == [{"user": "svc", "password": "$MESH_NATS_PASSWORD"}]
    acme = block["T_ACME"]["imports"]
    assert {
        "stream": {"account": "MESH", "subject": "mesh.evt.~acme.>"},
        "to": "mesh.evt.>",
    } in acme
    subjects = {i["service"]["subject"] for i in acme if "service" in i}
    assert subjects == {
        "mesh.evt.~acme.>",
        "$JS.API.CONSUMER.MSG.NEXT.MESH_EVENTS.deliver-a",
        "$JS.ACK.MESH_EVENTS.deliver-a.>",
    }
    # every export names the one account it is for
    assert all(len(e["accounts"]) == 1 for e in block["MESH"]["exports"])
    assert "jetstream" not in block["T_ACME"]
    text = render(block)
    assert '"password": $MESH_NATS_PASSWORD_ZETA_CO' in text  # a variable, not a string
    assert "pw-" not in text


def test_block_refuses_names_that_share_an_account_and_the_default_tenant() -> None:
    with pytest.raises(ValidationError, match="differ only in"):
        accounts_block("mesh", "S", [TenantAccount("a-b"), TenantAccount("a_b")])
    with pytest.raises(ValidationError, match="default tenant"):
        accounts_block("mesh", "S", [TenantAccount("default")])


@dataclass
class Server:
    url: str
    conf: Path
    accounts: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [find_nats_server(), "-c", str(self.conf)],
                env={**os.environ, **PASSWORDS},
                stderr=log,
            )

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    accounts = tmp_path / "accounts.conf"
    accounts.write_text(render(accounts_block("mesh", "MESH_EVENTS", [])))
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'host: 127.0.0.1\nport: {port}\njetstream {{ store_dir: "{tmp_path / "store"}" }}\n'
        'include "accounts.conf"\n'
    )
    server = Server(f"nats://127.0.0.1:{port}", conf, accounts, tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


async def _quiet(exc: Exception) -> None:
    pass


async def connect(url: str, user: str, password: str) -> nats.NATS:
    for _ in range(100):
        with contextlib.suppress(OSError, nats.errors.NoServersError):
            return await nats.connect(
                url, user=user, password=password, allow_reconnect=False, error_cb=_quiet
            )
        await asyncio.sleep(0.1)
    raise AssertionError("nats-server did not start")


@pytest.fixture
async def mesh(server: Server, tmp_path: Path) -> AsyncIterator[MeshClient]:
    await (await connect(server.url, "mesh", "pw-mesh")).close()  # it listens now
    settings = Settings(
        home=tmp_path / "home", nats_url=server.url, nats_user="mesh", nats_password="pw-mesh"
    )
    async with MeshClient(settings, name="test") as client:
        await client.init()
        yield client


async def test_each_tenant_account_sees_and_pulls_only_its_own(
    server: Server, mesh: MeshClient
) -> None:
    store = await TenantStore.open(mesh.port, mesh.names.tenants)
    for tenant in ("acme", "zeta"):
        await store.create(tenant)
        await mesh.add_target(Target(name=f"{tenant}-in", kind=TargetKind.NATS, tenant=tenant))
        await mesh.add_propagation(
            PropagationMode.UNIDIRECTIONAL, "shop", [f"{tenant}-in"], tenant=tenant
        )
    acme_consumer = (await mesh.registry.get_target("~acme.acme-in")).consumer

    # The operator writes the block with the CLI and restarts the server. (A reload,
    # SIGHUP, takes the new accounts, but on nats-server 2.15 a tenant's publish then
    # finds no responder in the events stream until a restart: docs/ARCHITECTURE.md.)
    env = {**env_for(mesh.settings), "MESH_NATS_USER": "mesh", "MESH_NATS_PASSWORD": "pw-mesh"}
    ok(await mesh_inproc(env, "tenant", "nats-accounts", "--out", str(server.accounts)))
    assert acme_consumer in server.accounts.read_text()
    server.stop()
    server.start()
    acme = await connect(server.url, "acme", "pw-acme")
    zeta = await connect(server.url, "zeta", "pw-zeta")
    for _ in range(100):  # the mesh's client reconnects by itself
        with contextlib.suppress(Exception):
            await mesh.port.stream_info(mesh.names.events)
            break
        await asyncio.sleep(0.1)
    try:
        seen: dict[str, list[str]] = {"acme": [], "zeta": []}
        for who, nc in (("acme", acme), ("zeta", zeta)):

            async def on_msg(msg: nats.aio.msg.Msg, who: str = who) -> None:
                seen[who].append(msg.subject)

            await nc.subscribe("mesh.evt.>", cb=on_msg)
            await nc.flush()

        # a raw publish, acked by JetStream through the account's import
        ack = await acme.request("mesh.evt.shop.paid", b'{"n": 1}', timeout=5)
        assert b'"seq"' in ack.data, ack.data
        await zeta.request("mesh.evt.shop.paid", b'{"n": 2}', timeout=5)
        # zeta spelling acme's qualified subject stays inside zeta's namespace
        await zeta.request("mesh.evt.~acme.shop.paid", b'{"n": 3}', timeout=5)
        await mesh.publish("shop", "paid", {"n": 4})  # the default tenant's

        stored = []
        info = await mesh.port.stream_info(mesh.names.events)
        for seq in range(1, info.state.last_seq + 1):
            stored.append((await mesh.port.get_msg(mesh.names.events, seq)).subject)
        assert stored == [
            "mesh.evt.~acme.shop.paid",
            "mesh.evt.~zeta.shop.paid",
            "mesh.evt.~zeta.~acme.shop.paid",
            "mesh.evt.shop.paid",
        ]
        await asyncio.sleep(0.3)
        assert seen["acme"] == ["mesh.evt.shop.paid"]
        assert seen["zeta"] == ["mesh.evt.shop.paid", "mesh.evt.~acme.shop.paid"]

        # acme pulls and acks its own target's consumer: exactly its one event
        sub = await acme.jetstream().pull_subscribe_bind(acme_consumer, mesh.names.events)
        msgs = await sub.fetch(10, timeout=2)
        assert [m.data for m in msgs] == [b'{"n": 1}']
        await msgs[0].ack_sync()
        for _ in range(50):
            state = await mesh.port.consumer_info(mesh.names.events, acme_consumer)
            if state.num_ack_pending == 0:
                break
            await asyncio.sleep(0.1)
        assert state.ack_floor.stream_seq == 1 and state.num_pending == 0

        # zeta reaches neither acme's consumer nor the mesh's JetStream API
        theirs = await zeta.jetstream().pull_subscribe_bind(acme_consumer, mesh.names.events)
        with pytest.raises((ServiceUnavailableError, NoRespondersError)):
            await theirs.fetch(1, timeout=1)
        for api in ("$JS.API.INFO", f"$JS.API.STREAM.INFO.{mesh.names.events}"):
            reply = await zeta.request(api, b"", timeout=2)
            assert b'"error"' in reply.data and b"503" in reply.data, reply.data
    finally:
        await acme.close()
        await zeta.close()
