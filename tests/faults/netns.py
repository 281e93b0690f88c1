"""A JetStream cluster whose nodes each live in their own network namespace.

Every node gets a namespace, a link to the root namespace for clients (``client`` inside,
10.x.y.z/30) and one veth pair per pair of nodes for its routes (named after the peer:
``n1`` in n0's namespace leads to n1). A namespace has only those connected routes and no
default route, so two nodes talk over their own link or not at all, and any pair can be
cut on its own: ``cut(0, 1)`` drops every packet on that link in both namespaces (an
nftables ``drop`` in the input and output hooks, silent as a pulled cable, established
connections included); ``heal`` removes the rules. ``lossy(a, b, percent)`` drops a random
share instead. Clients in the root namespace keep reaching every node: a partition here is
between brokers, not between a client and its broker.

Latency is not offered: ``tc netem`` needs ``sch_netem``, which some kernels (this CI's
among them) do not have; ``delay`` says so when asked.

Namespaces are named ``meshf-<pid>-<token>-n<i>``: ``stop`` removes them, and a new
cluster first removes those of processes that are gone (a test run killed hard).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from mesh.broker import EmbeddedBroker
from mesh.durability import SyncMode

NS_PREFIX = "meshf"
CLIENT_PORT = 4222
ROUTE_PORT = 6222
# Client links come from this range (one /28 per cluster, four /30s); route links live only
# inside the namespaces, so every cluster may use the same addresses for them.
CLIENT_NET = ipaddress.ip_network("10.201.0.0/16")
ROUTE_NET = "10.202.{pair}.{host}"


def _run(*cmd: str, input: str | None = None, check: bool = True) -> str:
    done = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why a namespaced cluster cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install the Debian package {package}"
    probe = f"{NS_PREFIX}-{os.getpid()}-probe"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe")
    except RuntimeError as exc:
        return f"network namespaces or nftables not permitted here: {exc}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def sweep_stale() -> None:
    """Remove namespaces left by test processes that no longer run."""
    for line in _run("ip", "netns", "list", check=False).splitlines():
        m = re.match(rf"({NS_PREFIX}-(\d+)-\S+)", line)
        if not m:
            continue
        pid = int(m.group(2))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            # Its nats-servers outlived it: they are this harness's own, stop them too.
            for child in _run("ip", "netns", "pids", m.group(1), check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(child), signal.SIGKILL)
            _run("ip", "netns", "del", m.group(1), check=False)
        except PermissionError:
            pass


class Disk(Protocol):
    """A node's store that can lose power (``tests/faults/lazyfs.LazyMount``)."""

    def start(self) -> None: ...
    def power_loss(self) -> None: ...
    def stop(self) -> None: ...


class NetnsBroker(EmbeddedBroker):
    """A nats-server started inside a network namespace (``ip netns exec`` execs it, so the
    child's pid is the server's and kill() reaches it)."""

    def __init__(self, netns: str, store_dir: Path, host: str, **kwargs: object) -> None:
        super().__init__(store_dir, port=CLIENT_PORT, host=host, **kwargs)  # type: ignore[arg-type]
        self.netns = netns

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command()]

    def check_port(self) -> None:
        """The port is the namespace's own: nothing else listens there."""


class NetCluster:
    """``size`` nats-servers, one per namespace, routed over one link per pair of nodes."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        cluster_name: str = "meshfaults",
        disk: Callable[[Path, Path], Disk] | None = None,
        sync: SyncMode = SyncMode.ALWAYS,
    ) -> None:
        """``disk(backing, mountpoint)``, when given, puts each node's store on a disk that
        ``crash`` can take the power from; ``sync`` is the brokers' fsync mode."""
        if not 2 <= size <= 4:
            raise ValueError(f"a cluster of 2 to 4 nodes (one /28 of client links), not {size}")
        self.root = root
        self.sync = sync
        self.disks: list[Disk] = (
            [disk(root / f"n{i}" / "disk", root / f"n{i}" / "mnt") for i in range(size)]
            if disk
            else []
        )
        self.size = size
        self.cluster_name = cluster_name
        self.token = secrets.token_hex(3)
        self.netns = [f"{NS_PREFIX}-{os.getpid()}-{self.token}-n{i}" for i in range(size)]
        self.client_addrs: list[str] = []
        self._client_links: list[str] = []
        self._cut: set[frozenset[int]] = set()
        self._loss: dict[frozenset[int], int] = {}
        self.nodes: list[NetnsBroker] = []

    # Addresses ------------------------------------------------------------------------

    @staticmethod
    def _pair(a: int, b: int) -> int:
        lo, hi = sorted((a, b))
        return lo * 16 + hi

    def link_addr(self, node: int, peer: int) -> str:
        """``node``'s address on its link to ``peer``."""
        return ROUTE_NET.format(pair=self._pair(node, peer), host=1 if node < peer else 2)

    def name(self, i: int) -> str:
        return f"n{i}"

    def url_of(self, i: int) -> str:
        return f"nats://{self.client_addrs[i]}:{CLIENT_PORT}"

    @property
    def url(self) -> str:
        return ",".join(self.url_of(i) for i in range(self.size))

    def _client_block(self) -> ipaddress.IPv4Network:
        taken = _run("ip", "-4", "-o", "addr", "show")
        blocks = list(CLIENT_NET.subnets(new_prefix=28))
        start = secrets.randbelow(len(blocks))
        for k in range(len(blocks)):
            block = blocks[(start + k) % len(blocks)]
            prefix = ".".join(str(block.network_address).split(".")[:3]) + "."
            if prefix not in taken:  # coarse (a /24) but safe
                return block
        raise RuntimeError(f"no free client block in {CLIENT_NET}")

    # Lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        sweep_stale()
        try:
            self._build_network()
            for d in self.disks:
                d.start()
            self.nodes = [self._broker(i) for i in range(self.size)]
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()
            raise

    def _build_network(self) -> None:
        block = list(self._client_block().hosts())
        for i, ns in enumerate(self.netns):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            outer = f"mf{self.token}c{i}"
            self._client_links.append(outer)
            root_addr, node_addr = block[4 * i], block[4 * i + 1]
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", "client", "netns", ns)
            _run("ip", "addr", "add", f"{root_addr}/30", "dev", outer)
            _run("ip", "link", "set", outer, "up")
            _run("ip", "-n", ns, "addr", "add", f"{node_addr}/30", "dev", "client")
            _run("ip", "-n", ns, "link", "set", "client", "up")
            self.client_addrs.append(str(node_addr))
        for a in range(self.size):
            for b in range(a + 1, self.size):
                _run(
                    "ip", "link", "add", "name", self.name(b), "netns", self.netns[a],
                    "type", "veth", "peer", "name", self.name(a), "netns", self.netns[b],
                )  # fmt: skip
                for node, peer in ((a, b), (b, a)):
                    ns, dev = self.netns[node], self.name(peer)
                    _run(
                        "ip",
                        "-n",
                        ns,
                        "addr",
                        "add",
                        f"{self.link_addr(node, peer)}/30",
                        "dev",
                        dev,
                    )
                    _run("ip", "-n", ns, "link", "set", dev, "up")
        for i in range(self.size):
            self._apply_rules(i)

    def _broker(self, i: int) -> NetnsBroker:
        routes = ",".join(
            f"nats://{self.link_addr(j, i)}:{ROUTE_PORT}" for j in range(self.size) if j != i
        )
        return NetnsBroker(
            self.netns[i],
            self.root / self.name(i) / ("mnt" if self.disks else "store"),
            self.client_addrs[i],
            log_file=self.root / f"{self.name(i)}.log",
            sync=self.sync,
            extra_args=[
                "--name", self.name(i),
                "--cluster_name", self.cluster_name,
                "--cluster", f"nats://0.0.0.0:{ROUTE_PORT}",
                "--routes", routes,
            ],
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the servers and remove the namespaces (and so every link); safe to repeat."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(timeout=5)
        for d in self.disks:
            with contextlib.suppress(Exception):
                d.stop()
        for outer in self._client_links:
            _run("ip", "link", "del", outer, check=False)
        for ns in self.netns:
            _run("ip", "netns", "del", ns, check=False)
        self._client_links.clear()

    def __enter__(self) -> NetCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        self.nodes[i].start(timeout=20)

    def crash(self, i: int) -> None:
        """SIGKILL node ``i``; with disks, its unsynced writes are lost too (power failure)."""
        self.nodes[i].kill()
        if self.disks:
            self.disks[i].power_loss()
            self.disks[i].start()

    # Faults ----------------------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        """Drop every packet between nodes ``a`` and ``b``, both ways."""
        self._cut.add(frozenset((a, b)))
        self._apply_rules(a, b)

    def heal(self, a: int, b: int) -> None:
        self._cut.discard(frozenset((a, b)))
        self._loss.pop(frozenset((a, b)), None)
        self._apply_rules(a, b)

    def isolate(self, i: int) -> None:
        """Cut node ``i`` from every other node (its clients still reach it)."""
        for j in range(self.size):
            if j != i:
                self.cut(i, j)

    def partition(self, *groups: Iterable[int]) -> None:
        """Cut every link between nodes of different groups; nodes in no group stand alone."""
        member = {n: g for g, nodes in enumerate(groups) for n in nodes}
        for a in range(self.size):
            for b in range(a + 1, self.size):
                if member.get(a, -1 - a) != member.get(b, -1 - b):
                    self.cut(a, b)

    def heal_all(self) -> None:
        self._cut.clear()
        self._loss.clear()
        self._apply_rules(*range(self.size))

    def lossy(self, a: int, b: int, percent: int) -> None:
        """Drop ``percent`` % of the packets between ``a`` and ``b``, at random, both ways."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0-100 %, not {percent}")
        self._loss[frozenset((a, b))] = percent
        self._apply_rules(a, b)

    def delay(self, a: int, b: int, ms: int) -> None:
        raise NotImplementedError("link delay needs tc netem (sch_netem), not in this kernel")

    def reaches(self, a: int, b: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from node ``a``'s namespace to ``b``'s route port opens."""
        probe = f"exec 3<>/dev/tcp/{self.link_addr(b, a)}/{ROUTE_PORT}"
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns[a], "timeout", str(timeout), "bash", "-c", probe],
            capture_output=True,
            check=False,
        )
        return done.returncode == 0

    @property
    def cuts(self) -> set[frozenset[int]]:
        return set(self._cut)

    def _apply_rules(self, *nodes: int) -> None:
        """Replace each node's ``meshfault`` table, atomically, with the links' current faults."""
        for i in nodes:
            rules = []
            for j in range(self.size):
                link = frozenset((i, j))
                if j == i:
                    continue
                if link in self._cut:
                    rules.append(f'"{self.name(j)}" drop')
                elif link in self._loss and i < j:  # once per link, not on both ends
                    rules.append(
                        f'"{self.name(j)}" numgen random mod 100 < {self._loss[link]} drop'
                    )
            lines = [
                "table inet meshfault {}",
                "delete table inet meshfault",
                "table inet meshfault {",
            ]
            for hook, match in (("input", "iifname"), ("output", "oifname")):
                lines.append(f"  chain {hook} {{")
                lines.append(f"    type filter hook {hook} priority 0; policy accept;")
                lines += [f"    {match} {rule}" for rule in rules]
                lines.append("  }")
            lines.append("}")
            script = "\n".join(lines) + "\n"
            _run("ip", "netns", "exec", self.netns[i], "nft", "-f", "-", input=script)
