"""One namespaced 3-node cluster for the fault tests of a run (it takes ~10 s to elect its
first meta leader); each test gets its own streams (a prefix) and a whole cluster back."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mesh.durability import SyncMode
from tests.faults.netns import NetCluster, unavailable_reason

# MESH_TEST_FAULTS_SYNC=lazy runs the cluster with nats-server's lazy fsync (the opt-out):
# then the crash tests are expected to fail, which shows the harness can see the loss.
SYNC_VAR = "MESH_TEST_FAULTS_SYNC"


def _disk() -> type | None:
    """LazyMount when FUSE works here: node stores then lose unsynced writes on a crash."""
    try:
        from tests.faults.lazyfs import LazyMount, fuse_unavailable
    except ImportError:
        return None
    return None if fuse_unavailable() else LazyMount


@pytest.fixture(scope="session")
def netcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    sync = SyncMode(os.environ.get(SYNC_VAR, SyncMode.ALWAYS))
    cluster = NetCluster(tmp_path_factory.mktemp("netcluster"), disk=_disk(), sync=sync)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(netcluster: NetCluster) -> Iterator[NetCluster]:
    """The session's cluster, whole again after each test whatever the test did to it."""
    yield netcluster
    netcluster.heal_all()
    for i, node in enumerate(netcluster.nodes):
        if not node.running:
            netcluster.restart(i)
