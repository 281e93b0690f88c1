"""Partitions of a 3-node R3 cluster at the network level, under steady load (issue #14).

Each node runs in its own network namespace (``tests/faults/netns.py``); a cut drops every
packet on the link between two nodes, silently. Three publishers, each pinned to one node,
publish at a steady pace and retry an id until it is acknowledged; one consumer reads a
``nats`` target's feed. After the partition heals, publishing and delivery must resume and
every acknowledged id must be in the events stream and at the consumer: 0 lost. Duplicates
(redeliveries) and reordering are counted and printed (``tests/faults/checker.py``).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.faults.netns import CLIENT_PORT, NetCluster
from tests.faults.scenario import Scene, full_only, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

LOSS_PCT = 20
FAULT_S = 8.0  # about an election (4-9 s): the majority's new leader is usually seen


def reaching_leader(scene: Scene) -> list[str]:
    """Publishers whose node still reaches the stream leader: they need no election."""
    leader, cluster = scene.stream_leader, scene.cluster
    return [
        f"p{i}"
        for i in range(cluster.size)
        if i == leader or frozenset((i, leader)) not in cluster.cuts
    ]


async def partition_minority(scene: Scene) -> None:
    victim = scene.followers[0]
    scene.what.append(f"isolate follower n{victim} for {FAULT_S:.0f}s")
    scene.cluster.isolate(victim)
    scene.steady = reaching_leader(scene)
    await asyncio.sleep(FAULT_S)
    scene.cluster.heal_all()


async def partition_leader(scene: Scene) -> None:
    scene.what.append(f"isolate stream leader n{scene.stream_leader} for {FAULT_S:.0f}s")
    scene.cluster.isolate(scene.stream_leader)
    await asyncio.sleep(FAULT_S)
    scene.cluster.heal_all()


async def partition_bridge(scene: Scene) -> None:
    """The 3-node bridge: the leader and one follower cannot see each other, the other
    follower sees both (cutting two links of one node is ``isolate``, tested above)."""
    a, (b, c) = scene.stream_leader, scene.followers
    scene.what.append(f"cut n{a}-n{c} for {FAULT_S:.0f}s, n{b} bridges")
    scene.cluster.cut(a, c)
    scene.steady = reaching_leader(scene)
    await asyncio.sleep(FAULT_S)
    scene.cluster.heal_all()


def test_a_cut_drops_exactly_that_link(cluster: NetCluster) -> None:
    """Partitions are real at the network level: a cut stops TCP between those two nodes
    only, clients in the root namespace still reach every node, and a heal restores it."""
    pairs = [(a, b) for a in range(cluster.size) for b in range(cluster.size) if a != b]
    assert all(cluster.reaches(a, b) for a, b in pairs)
    cluster.cut(0, 1)
    try:
        reach = {(a, b): cluster.reaches(a, b, timeout=0.5) for a, b in pairs}
        assert reach == {(a, b): {a, b} != {0, 1} for a, b in pairs}
        for i in range(cluster.size):
            with socket.create_connection((cluster.client_addrs[i], CLIENT_PORT), timeout=2):
                pass
    finally:
        cluster.heal(0, 1)
    assert cluster.reaches(0, 1) and cluster.reaches(1, 0)


async def lossy_links(scene: Scene) -> None:
    scene.what.append(f"{LOSS_PCT}% of packets dropped on every link for {FAULT_S:.0f}s")
    for a in range(scene.cluster.size):
        for b in range(a + 1, scene.cluster.size):
            scene.cluster.lossy(a, b, LOSS_PCT)
    await asyncio.sleep(FAULT_S)
    scene.cluster.heal_all()


@full_only  # the leader and bridge cases cover a minority's side too
async def test_partition_minority(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "pmin", partition_minority)


async def test_partition_leader(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "plead", partition_leader)


async def test_partition_bridge(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "pbridge", partition_bridge)


@full_only
async def test_lossy_links(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "ploss", lossy_links)
