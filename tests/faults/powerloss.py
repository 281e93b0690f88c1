"""Power loss on the single embedded node: publish at a steady rate, kill -9 nats-server and
the sink, drop every write not fsynced (tests/faults/lazyfs.py), restart, and count with the
checker what the stream and the sink's ``events`` table lost of what was acknowledged.

One mesh lives through every round: each check covers all events acknowledged so far.

    python -m tests.faults.powerloss --rounds 20               # sync always (the default)
    python -m tests.faults.powerloss --rounds 5 --sync lazy    # the opt-out: shows the loss
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.durability import SyncMode
from mesh.observability import configure_logging
from mesh.streams import StreamNames
from tests.faults.checker import Report, check
from tests.faults.lazyfs import LazyMount

PUBLISHER = "publisher"
SOURCE = "powerloss"


@dataclass
class Harness:
    """One mesh on a LazyFS mount: the broker's store and the sink's SQLite file on it."""

    root: Path
    sync: SyncMode
    rate: float = 200.0  # events per second, one publish awaited at a time
    acked: list[str] = field(default_factory=list)
    seq: int = 0

    def __post_init__(self) -> None:
        self.mount = LazyMount(self.root / "disk", self.root / "mnt")
        self.port = free_port()
        self.broker = EmbeddedBroker(
            self.root / "mnt" / "nats",
            port=self.port,
            log_file=self.root / "nats.log",
            sync=self.sync,
        )
        self.db = self.root / "mnt" / "mesh.db"
        self.settings = Settings(
            home=self.root / "home",
            nats_url=self.broker.url,
            db_url=f"sqlite:///{self.db}",
            allow_private_targets=True,
            encryption=False,
        )
        self.sink: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.mount.start)
        await self.broker.astart(timeout=30)
        async with MeshClient(self.settings, name="powerloss-init") as c:
            await c.init()
        self._start_sink()

    def _start_sink(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update(
            MESH_HOME=str(self.settings.home),
            MESH_NATS_URL=self.broker.url,
            MESH_DB_URL=self.settings.db_url,
            MESH_ENCRYPTION="false",
            MESH_CONFIG=str(self.root / "no-mesh.toml"),
            MESH_LOG_LEVEL="warning",
        )
        with open(self.root / "sink.log", "ab") as log:
            self.sink = subprocess.Popen(
                [sys.executable, "-m", "mesh.cli", "serve", "sink"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )

    def power_loss(self) -> None:
        """kill -9 the sink and nats-server, then the filesystem's unsynced writes."""
        if self.sink is not None:
            self.sink.kill()
            self.sink.wait()
            self.sink = None
        self.broker.kill()
        self.mount.power_loss()

    async def stop(self) -> None:
        if self.sink is not None:
            self.sink.terminate()
            try:
                await asyncio.to_thread(self.sink.wait, 15)
            except subprocess.TimeoutExpired:
                self.sink.kill()
            self.sink = None
        await self.broker.astop()
        await asyncio.to_thread(self.mount.stop)

    # -- load ---------------------------------------------------------------------------
    async def publish_until(self, stop: asyncio.Event) -> None:
        """Publish at ``rate``; an id counts as acknowledged once ``publish`` returns."""
        async with MeshClient(self.settings, name="powerloss-pub") as c:
            interval = 1.0 / self.rate
            next_at = time.monotonic()
            while not stop.is_set():
                self.seq += 1
                eid = f"pl-{self.seq:07d}"
                try:
                    await c.publish(SOURCE, "tick", {"n": self.seq}, id=eid, timeout=2.0)
                except Exception:
                    return  # the broker is gone: this one was never acknowledged
                self.acked.append(eid)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    # -- observation --------------------------------------------------------------------
    async def stream_ids(self) -> list[str]:
        nc = await nats.connect(self.broker.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(StreamNames.for_prefix(self.settings.prefix).events)
            want = info.state.messages
            sub = await js.pull_subscribe(
                f"{self.settings.prefix}.evt.>",
                stream=info.config.name,
                config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
            )
            ids: list[str] = []
            while len(ids) < want:
                try:
                    msgs = await sub.fetch(1000, timeout=2)
                except nats.errors.TimeoutError:
                    break
                ids.extend((m.headers or {}).get("ce-id", "?") for m in msgs)
            await sub.unsubscribe()
            return ids
        finally:
            await nc.close()

    def sink_ids(self) -> list[str]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            return [r[0] for r in db.execute("SELECT id FROM events")]

    async def settled(self, timeout: float = 30.0) -> None:
        """Wait until the sink holds every event the stream holds (or give up and report)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.Error):
                if set(await self.stream_ids()) <= set(await asyncio.to_thread(self.sink_ids)):
                    return
            await asyncio.sleep(0.3)

    async def observe(self) -> Report:
        await self.settled()
        return check(
            {PUBLISHER: self.acked},
            {"stream": await self.stream_ids(), "sink.events": self.sink_ids()},
            unordered={"sink.events"},
        )


@dataclass
class RoundResult:
    round: int
    acked_total: int
    report: Report


async def run(
    root: Path, sync: SyncMode, rounds: int, publish_s: float, rate: float
) -> list[RoundResult]:
    """``rounds`` power losses on one mesh; the checker's report after each restart."""
    h = Harness(root, sync, rate=rate)
    await h.start()
    results = []
    try:
        for n in range(1, rounds + 1):
            stop = asyncio.Event()
            pub = asyncio.create_task(h.publish_until(stop))
            await asyncio.sleep(publish_s)
            # The power goes while publishes are in flight.
            await asyncio.to_thread(h.power_loss)
            stop.set()
            await pub
            await h.start()
            results.append(RoundResult(n, len(h.acked), await h.observe()))
    finally:
        with contextlib.suppress(Exception):
            await h.stop()
    return results


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mesh-powerloss-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults.powerloss", description=__doc__)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--sync", choices=[m.value for m in SyncMode], default="always")
    ap.add_argument("--seconds", type=float, default=1.5, help="publishing per round")
    ap.add_argument("--rate", type=float, default=200.0, help="events per second")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    from tests.faults.lazyfs import fuse_unavailable

    why = fuse_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    configure_logging("console", "warning")  # reconnect chatter after each power loss
    started = time.monotonic()
    with workdir(args.keep) as root:
        results = asyncio.run(run(root, SyncMode(args.sync), args.rounds, args.seconds, args.rate))
        if args.keep:
            print(f"work directory: {root}")
    for r in results:
        for place in r.report.places:
            print(f"round {r.round:2d} acked={r.acked_total:5d} {place}")
    final = results[-1].report if results else None
    lost_rounds = sum(1 for r in results if not r.report.ok)
    print(
        f"sync={args.sync} rounds={len(results)} acked={results[-1].acked_total if results else 0}"
        f" rounds_with_loss={lost_rounds}"
        f" final_lost_stream={final['stream'].lost if final else '-'}"
        f" final_lost_sink={final['sink.events'].lost if final else '-'}"
        f" seconds={time.monotonic() - started:.1f}"
    )
    return 0 if lost_rounds == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
