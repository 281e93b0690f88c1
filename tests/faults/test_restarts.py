"""Crash-restarts of cluster nodes under steady load (issue #14).

A crash is SIGKILL of the node's nats-server and, when FUSE works here, a power failure of
its disk (``tests/faults/lazyfs.py``: every write not fsynced is gone). Nodes crash one at a
time (each rejoins and catches up before the next goes), then two at once (the stream
loses its quorum until they are back). Publishing and delivery must resume and the
checker must find 0 acknowledged events lost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.faults.netns import NetCluster
from tests.faults.scenario import Scene, full_only, run_scenario, wait_current

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DOWN_S = 2.0
PARTITION_S = 4.0


async def crash(scene: Scene, nodes: list[int], *, then_heal: bool = False) -> None:
    kind = "kill -9 + lost unsynced writes" if scene.cluster.disks else "kill -9"
    scene.what.append(f"{kind}: {', '.join(f'n{i}' for i in nodes)}")
    for i in nodes:
        scene.cluster.crash(i)
    if then_heal:
        scene.cluster.heal_all()
    await asyncio.sleep(DOWN_S)
    for i in nodes:
        await asyncio.to_thread(scene.cluster.restart, i)
    not_current = await wait_current(scene.observer)
    if not_current:
        scene.what.append(not_current)  # the count after it says what was lost


async def one_at_a_time(scene: Scene) -> None:
    # The leader first: the hardest one to lose.
    for i in [scene.stream_leader, *scene.followers]:
        await crash(scene, [i])


async def two_at_once(scene: Scene) -> None:
    await crash(scene, [scene.stream_leader, scene.followers[0]])


@full_only  # three crashes in a row: the longest case; two at once stays in the suite
async def test_restart_one_at_a_time(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "rone", one_at_a_time)


async def test_restart_two_at_once(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "rtwo", two_at_once)


async def partition_then_crash(scene: Scene) -> None:
    """Jepsen's combination: a follower is cut off and falls behind while the other two
    go on; those two then lose power together and the partition heals. Only their disks
    held the newest acknowledged events."""
    behind = scene.followers[1]
    scene.what.append(f"isolate n{behind} for {PARTITION_S:.0f}s")
    scene.cluster.isolate(behind)
    await asyncio.sleep(PARTITION_S)
    await crash(scene, [scene.stream_leader, scene.followers[0]], then_heal=True)


@full_only
async def test_partition_then_crash_of_the_majority(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "rpart", partition_then_crash)


async def all_at_once(scene: Scene) -> None:
    await crash(scene, [scene.stream_leader, *scene.followers])


@full_only  # a whole-cluster power failure: with lazy fsync this is where events go missing
async def test_restart_all_at_once(cluster: NetCluster, tmp_path: Path) -> None:
    await run_scenario(cluster, tmp_path, "rall", all_at_once)
