"""Partitions of a 3-node R3 cluster at the network level, under steady load (issue #14).

Each node runs in its own network namespace (``tests/faults/netns.py``); a cut drops every
packet on the link between two nodes, silently. Three publishers, each pinned to one node,
publish at a steady pace and retry an id until it is acknowledged; one consumer reads a
``nats`` target's feed. After the fault heals, delivery must resume and every acknowledged
id must be in the events stream and at the consumer: 0 lost. Duplicates (redeliveries) and
reordering are counted and printed by ``tests/faults/checker.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.client import MeshClient
from mesh.config import Settings
from tests.faults.checker import check
from tests.faults.netns import NetCluster, unavailable_reason
from tests.faults.workload import TARGET, Workload, stream_ids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

WARMUP_S = 2.0
FAULT_S = 10.0
RESUME_ACKS = 5  # acks each publisher must get after the heal: delivery resumed


@pytest.fixture(scope="module")
def netcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = NetCluster(tmp_path_factory.mktemp("netcluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(netcluster: NetCluster) -> Iterator[NetCluster]:
    """The module's cluster, whole again after each test whatever it did."""
    yield netcluster
    netcluster.heal_all()
    for i, node in enumerate(netcluster.nodes):
        if not node.running:
            netcluster.restart(i)


def settings_for(cluster: NetCluster, tmp_path: Path, prefix: str) -> Settings:
    """Every test gets streams of its own (its own prefix) on the shared cluster."""
    return Settings(
        home=tmp_path / "home",
        nats_url=cluster.url,
        prefix=prefix,
        stream_replicas=3,
        allow_private_targets=True,
    )


async def leaders(c: MeshClient) -> tuple[int, int]:
    """Node indexes leading the events stream and the target's consumer."""
    for _ in range(100):
        try:
            si = await c.js.stream_info(c.names.events)
            ci = await c.js.consumer_info(c.names.events, f"deliver-{TARGET}")
            if si.cluster and si.cluster.leader and ci.cluster and ci.cluster.leader:
                return int(si.cluster.leader[1:]), int(ci.cluster.leader[1:])
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("no stream or consumer leader")


async def wait_current(c: MeshClient, timeout: float = 30.0) -> None:
    """Until the events stream has a leader and both followers are current."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            si = await c.js.stream_info(c.names.events)
            reps = si.cluster.replicas or [] if si.cluster else []
            if si.cluster and si.cluster.leader and len(reps) == 2 and all(r.current for r in reps):
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "the events stream did not become current"
        await asyncio.sleep(0.25)


async def run_fault(
    cluster: NetCluster,
    tmp_path: Path,
    prefix: str,
    fault: str,
) -> None:
    settings = settings_for(cluster, tmp_path, prefix)
    work = Workload(settings, {f"p{i}": cluster.url_of(i) for i in range(cluster.size)})
    await work.setup()
    async with MeshClient(settings, name="faults-observer") as observer:
        stream_leader, consumer_leader = await leaders(observer)
        others = [i for i in range(cluster.size) if i != stream_leader]
        await work.start()
        try:
            await asyncio.sleep(WARMUP_S)
            fault_at = time.monotonic()
            if fault == "minority":
                what = f"isolate follower n{others[0]}"
                cluster.isolate(others[0])
            elif fault == "leader":
                what = f"isolate stream leader n{stream_leader}"
                cluster.isolate(stream_leader)
            elif fault == "bridge":
                # n_b sees both sides; the leader and the other follower do not see each other.
                what = f"cut n{stream_leader}-n{others[1]}, n{others[0]} bridges"
                cluster.cut(stream_leader, others[1])
            else:
                raise ValueError(fault)
            # Publishers whose node still reaches the leader need no election to go on.
            steady = [] if fault == "leader" else [
                f"p{i}" for i in range(cluster.size)
                if i == stream_leader or frozenset((i, stream_leader)) not in cluster.cuts
            ]  # fmt: skip
            await asyncio.sleep(FAULT_S)
            cluster.heal_all()
            healed_at = time.monotonic()
            during = {
                p: work.progress.acked_between(p, fault_at, healed_at) for p in work.progress.acked
            }
            received_during = work.progress.received_since(fault_at) - work.progress.received_since(
                healed_at
            )
            after = await work.wait_acks(healed_at, RESUME_ACKS, timeout=60)
            work.stop_publishing()
            missing = await work.wait_consumed(timeout=60)
            resumed_s = time.monotonic() - healed_at
            await wait_current(observer)
            in_stream = await stream_ids(observer)
        finally:
            await work.close()
        new_leader, new_consumer_leader = await leaders(observer)

    report = check(
        acked=work.progress.acked,
        observed={"stream": in_stream, f"consumer:{TARGET}": work.progress.received},
    )
    print(
        f"\n[{prefix}] {what}; leaders before: stream n{stream_leader} consumer"
        f" n{consumer_leader}, after: stream n{new_leader} consumer n{new_consumer_leader}"
    )
    print(
        f"[{prefix}] acks during the fault per publisher: {during};"
        f" received during the fault: {received_during}"
    )
    print(f"[{prefix}] acks after the heal: {after}; all consumed {resumed_s:.1f}s after the heal")
    print(f"[{prefix}] errors retried: {dict(work.progress.errors)}")
    print(report)
    stalled = [p for p in steady if during[p] == 0]
    assert not stalled, f"publishers on the leader's side made no progress: {stalled}"
    assert min(after.values()) >= RESUME_ACKS, f"publishing did not resume: {after}"
    assert not missing, f"{len(missing)} acknowledged events never consumed"
    assert report.lost == 0, str(report)
    assert sum(len(ids) for ids in work.progress.acked.values()) > 0


async def test_partition_minority(cluster: NetCluster, tmp_path: Path) -> None:
    await run_fault(cluster, tmp_path, "pmin", "minority")


async def test_partition_leader(cluster: NetCluster, tmp_path: Path) -> None:
    await run_fault(cluster, tmp_path, "plead", "leader")


async def test_partition_bridge(cluster: NetCluster, tmp_path: Path) -> None:
    await run_fault(cluster, tmp_path, "pbridge", "bridge")
