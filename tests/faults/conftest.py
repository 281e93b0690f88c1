"""One namespaced 3-node cluster for the fault tests of a run (it takes ~10 s to elect its
first meta leader); each test gets its own streams (a prefix) and a whole cluster back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.netns import NetCluster, unavailable_reason


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
    cluster = NetCluster(tmp_path_factory.mktemp("netcluster"), disk=_disk())
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
