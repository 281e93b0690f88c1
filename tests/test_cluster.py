"""A 3-node NATS cluster on loopback with replicas 3: deliveries survive losing a node.

Three nats-servers (free ports, own store dirs) form a JetStream cluster; the
streams are R3. The webhook egress delivers to a local receiver while the node
that leads the events stream is SIGKILLed; every published event still arrives
(unique webhook-ids), and the node rejoins when restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import RetryPolicy, Target, TargetKind
from tests.support import publish_reliably

pytestmark = pytest.mark.slow

N_EVENTS = 120


class Cluster:
    def __init__(self, root: Path) -> None:
        self.client_ports = [free_port() for _ in range(3)]
        self.route_ports = [free_port() for _ in range(3)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.route_ports)
        self.nodes = [
            EmbeddedBroker(
                root / f"n{i}",
                port=self.client_ports[i],
                log_file=root / f"n{i}.log",
                extra_args=[
                    "--name",
                    f"n{i}",
                    "--cluster_name",
                    "meshtest",
                    "--cluster",
                    f"nats://127.0.0.1:{self.route_ports[i]}",
                    "--routes",
                    routes,
                ],
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def start(self) -> None:
        for n in self.nodes:
            n.start()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start()
    yield c
    c.stop()


async def _wait_for_jetstream(c: MeshClient, deadline: float) -> None:
    while True:
        try:
            await c.js.account_info()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def test_deliveries_survive_a_node_kill(cluster: Cluster, tmp_path: Path) -> None:
    from services.egress.service import WebhookEgress

    seen: set[str] = set()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        seen.add(request.headers["webhook-id"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    settings = Settings(
        home=tmp_path / "home",
        nats_url=cluster.url,
        stream_replicas=3,
        allow_private_targets=True,
    )
    async with MeshClient(settings, name="cluster-test") as c:
        await _wait_for_jetstream(c, time.monotonic() + 30)
        for _ in range(40):  # the meta leader may still be settling
            try:
                await c.init()
                break
            except Exception:
                await asyncio.sleep(0.5)
        info = await c.js.stream_info(c.names.events)
        assert info.config.num_replicas == 3
        await c.add_target(
            Target(
                name="crm",
                kind=TargetKind.WEBHOOK,
                url=f"http://127.0.0.1:{port}/hook",
                timeout_s=5,
                retry=RetryPolicy(base_s=0.1, max_delay_s=1, max_retries=50),
            )
        )
        await c.add_propagation("unidirectional", "shop", ["crm"])
        egress = WebhookEgress(settings)
        await egress.start()
        try:
            published = [
                await publish_reliably(c, f"evt-{i:05d}", {"i": i}, attempts=120, timeout=2)
                for i in range(N_EVENTS // 3)
            ]

            # Kill the node that leads the events stream, mid-stream.
            leader = (await c.js.stream_info(c.names.events)).cluster.leader
            victim = next(i for i, n in enumerate(cluster.nodes) if f"n{i}" == leader)
            cluster.nodes[victim].kill()
            published += [
                await publish_reliably(c, f"evt-{i:05d}", {"i": i}, attempts=120, timeout=2)
                for i in range(N_EVENTS // 3, N_EVENTS)
            ]

            deadline = time.monotonic() + 90
            while len(seen & set(published)) < N_EVENTS and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            assert set(published) <= seen, f"missing {len(set(published) - seen)} events"

            # The node rejoins and catches up.
            cluster.nodes[victim].start()
            deadline = time.monotonic() + 60
            while True:
                si = await c.js.stream_info(c.names.events)
                replicas = {r.name: r for r in (si.cluster.replicas or [])}
                rejoined = f"n{victim}" in replicas or si.cluster.leader == f"n{victim}"
                if rejoined and all(r.current for r in replicas.values()):
                    break
                assert time.monotonic() < deadline, f"node n{victim} did not rejoin: {replicas}"
                await asyncio.sleep(0.5)
        finally:
            await egress.stop()
            await runner.cleanup()
