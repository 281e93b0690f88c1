"""One fault scenario on the namespaced cluster: steady load, the fault, recovery, the count.

``run_scenario`` sets up streams of the test's own prefix (R3), starts a ``Workload``, lets
it run, calls the scenario's ``fault`` (which returns once the cluster is whole again), then
requires that every publisher is acknowledged again (delivery resumed), that the consumer
gets every acknowledged id, and that the checker finds 0 lost in the stream and at the
consumer. It prints what happened: leaders, acks during and after, retried errors, and the
checker's lost / duplicated / reordered counts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.js import errors as js_errors

from mesh.client import MeshClient
from mesh.config import Settings
from tests.faults.checker import Report, check
from tests.faults.netns import NetCluster
from tests.faults.workload import TARGET, Workload, stream_ids

# The suite runs a representative subset (about a minute); the rest run with this set.
FULL_VAR = "MESH_TEST_FAULTS"
full_only = pytest.mark.skipif(
    os.environ.get(FULL_VAR) != "full",
    reason=f"part of the full fault set: run with {FULL_VAR}=full",
)

WARMUP_S = 1.5
RESUME_ACKS = 5  # acks each publisher must get after recovery: publishing resumed
# A delivery lost on its way to a cut-off consumer comes back after ack_wait: short here.
ACK_WAIT_S = 5.0


@dataclass
class Scene:
    """What a fault needs to know and where it says what it did."""

    cluster: NetCluster
    observer: MeshClient
    stream_leader: int
    consumer_leader: int
    what: list[str] = field(default_factory=list)
    # Publishers that must make progress during the fault (their node keeps a quorum).
    steady: list[str] = field(default_factory=list)

    @property
    def followers(self) -> list[int]:
        return [i for i in range(self.cluster.size) if i != self.stream_leader]


def settings_for(cluster: NetCluster, tmp_path: Path, prefix: str) -> Settings:
    return Settings(
        home=tmp_path / "home",
        nats_url=cluster.url,
        prefix=prefix,
        stream_replicas=3,
        ack_wait_min_s=ACK_WAIT_S,
        allow_private_targets=True,
    )


async def leaders(c: MeshClient, timeout: float = 30.0) -> tuple[int, int]:
    """Node indexes leading the events stream and the target's consumer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            si = await c.js.stream_info(c.names.events)
            ci = await c.js.consumer_info(c.names.events, f"deliver-{TARGET}")
            if si.cluster and si.cluster.leader and ci.cluster and ci.cluster.leader:
                return int(si.cluster.leader[1:]), int(ci.cluster.leader[1:])
        except Exception:
            pass
        assert time.monotonic() < deadline, "no stream or consumer leader"
        await asyncio.sleep(0.2)


async def wait_current(c: MeshClient, timeout: float = 60.0) -> str | None:
    """Wait until the events stream has a leader and both followers are current; None
    then, else what the last look saw (a stream that a crash took away never comes back)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            si = await c.js.stream_info(c.names.events)
            reps = (si.cluster.replicas or []) if si.cluster else []
            if si.cluster and si.cluster.leader and len(reps) == 2 and all(r.current for r in reps):
                return None
            last = f"cluster {si.cluster}"
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            return f"the events stream did not become current in {timeout:.0f}s ({last})"
        await asyncio.sleep(0.25)


async def read_stream(c: MeshClient, scene: Scene, timeout: float = 30.0) -> list[str]:
    """The stream's ids; a transient refusal (503, a timeout) is asked again, a stream that
    is gone reads as empty (everything in it is lost) and says so."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await stream_ids(c)
        except js_errors.NotFoundError as exc:
            scene.what.append(f"stream gone: {exc}")
            return []
        except Exception as exc:
            if time.monotonic() > deadline:
                scene.what.append(f"stream unreadable: {type(exc).__name__}: {exc}")
                return []
            await asyncio.sleep(0.5)


async def run_scenario(
    cluster: NetCluster,
    tmp_path: Path,
    prefix: str,
    fault: Callable[[Scene], Awaitable[None]],
) -> Report:
    settings = settings_for(cluster, tmp_path, prefix)
    work = Workload(
        settings,
        {f"p{i}": cluster.url_of(i) for i in range(cluster.size)},
        sink_db=tmp_path / "sink.db",
    )
    await work.setup()
    async with MeshClient(settings, name="faults-observer") as observer:
        stream_leader, consumer_leader = await leaders(observer)
        scene = Scene(cluster, observer, stream_leader, consumer_leader)
        await work.start()
        try:
            await asyncio.sleep(WARMUP_S)
            fault_at = time.monotonic()
            await fault(scene)
            healed_at = time.monotonic()
            progress = work.progress
            during = {p: progress.acked_between(p, fault_at, healed_at) for p in progress.acked}
            received_during = progress.received_since(fault_at) - progress.received_since(healed_at)
            after = await work.wait_acks(healed_at, RESUME_ACKS, timeout=45)
            resumed = min(after.values()) >= RESUME_ACKS
            work.stop_publishing()
            missing = await work.wait_consumed(timeout=60 if resumed else 5)
            unsunk = await work.wait_sunk(timeout=30 if resumed else 5)
            consumed_s = time.monotonic() - healed_at
            not_current = await wait_current(observer, timeout=60 if resumed else 5)
            in_stream = await read_stream(observer, scene)
        finally:
            await work.close()
        try:
            new_leaders: tuple[int | str, int | str] = await leaders(observer, timeout=5)
        except AssertionError:
            new_leaders = ("?", "?")

    report = check(
        acked=work.progress.acked,
        observed={
            "stream": in_stream,
            f"consumer:{TARGET}": work.progress.received,
            "sink.events": work.sink_ids(),
        },
        unordered={"sink.events"},
    )
    disks = "lazyfs (unsynced writes lost on crash)" if cluster.disks else "plain"
    print(f"\n[{prefix}] broker sync {cluster.sync}, disks {disks}")
    print(f"[{prefix}] {'; '.join(scene.what)}")
    print(
        f"[{prefix}] leaders (stream, consumer): before n{stream_leader}, n{consumer_leader};"
        f" after n{new_leaders[0]}, n{new_leaders[1]}"
    )
    print(
        f"[{prefix}] acks during the fault: {during}, received during it: {received_during};"
        f" acks after: {after}; all consumed and stored {consumed_s:.1f}s after recovery"
    )
    print(f"[{prefix}] errors retried: {dict(work.progress.errors)}")
    print(report)
    stalled = [p for p in scene.steady if during[p] == 0]
    assert report.lost == 0, str(report)
    assert not stalled, f"publishers on the quorum's side made no progress: {stalled}"
    assert resumed, f"publishing did not resume: {after}"
    assert not missing, f"{len(missing)} acknowledged events never consumed"
    assert not unsunk, f"{len(unsunk)} acknowledged events never stored by the sink"
    assert not_current is None, not_current
    assert sum(len(ids) for ids in work.progress.acked.values()) > 0
    return report
