"""Soak: a steady publish rate for a long run with faults injected; loss must be 0.

Runs a nats-server (file storage), the webhook egress and the sink as separate
processes (`mesh serve ...`), a local aiohttp receiver that fails a few percent
of requests, and a publisher at a steady rate. Every ``--fault-every`` seconds
it SIGKILLs one of broker / egress / sink (in turn) and restarts it. At the end
it waits for the backlog to drain and reports:

- loss: published ids never answered 200 by the receiver (must be 0),
- duplicates: receipts beyond the first per id (at-least-once makes some normal),
- sink rows vs published (must be equal: stored exactly once),
- RSS of the egress and sink over time (min / median / max, sampled every 10 s).

    .venv/bin/python bench/soak.py                  # 30 minutes, 50 events/s
    .venv/bin/python bench/soak.py --minutes 2 --rate 100 --fault-every 20

Not part of the test suite. Exit status 1 when anything was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from aiohttp import web

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import MeshError
from mesh.observability import configure_logging
from mesh.registry import RetryPolicy, Target, TargetKind
from mesh.storage import open_store


class Service:
    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh.cli", "serve", self.name],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def rss_mb(self) -> float | None:
        if not self.proc or self.proc.poll() is not None:
            return None
        try:
            proc = psutil.Process(self.proc.pid)
            if time.time() - proc.create_time() < 5:
                return None  # still importing: not a steady-state figure
            return float(proc.memory_info().rss) / 2**20
        except psutil.Error:
            return None


async def main(args: argparse.Namespace) -> int:
    configure_logging("console", "warning")
    root = Path(tempfile.mkdtemp(prefix="mesh-soak-"))
    broker = EmbeddedBroker(root / "nats", port=free_port(), log_file=root / "nats.log")
    broker.start()
    settings = Settings(home=root / "home", nats_url=broker.url, allow_private_targets=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_HOME=str(settings.home),
        MESH_NATS_URL=broker.url,
        MESH_DB_URL=settings.db_url,
        MESH_ALLOW_PRIVATE_TARGETS="1",
        MESH_LOG_LEVEL="warning",
        MESH_LOG_FORMAT="json",
    )

    rng = random.Random(7)
    ok_ids: Counter[str] = Counter()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        if rng.random() < args.fail_ratio:
            return web.Response(status=503)
        ok_ids[request.headers.get("webhook-id", "")] += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    rx_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", rx_port).start()

    published: list[str] = []
    rss: dict[str, list[float]] = {"webhook-egress": [], "sink": []}
    services = {n: Service(n, env, root / f"{n}.log") for n in rss}
    async with MeshClient(settings, name="soak") as c:
        await c.init()
        await c.add_target(
            Target(
                name="soak",
                kind=TargetKind.WEBHOOK,
                url=f"http://127.0.0.1:{rx_port}/hook",
                timeout_s=5,
                circuit_open_s=2,
                retry=RetryPolicy(base_s=0.2, max_delay_s=5, max_retries=100),
            )
        )
        await c.add_propagation("unidirectional", "load", ["soak"])
        for s in services.values():
            s.start()

        end = time.monotonic() + args.minutes * 60
        faults = ["broker", "webhook-egress", "sink"]
        next_fault = time.monotonic() + args.fault_every
        next_sample = time.monotonic()
        t0 = time.monotonic()
        i = 0
        print(f"soak: {args.minutes} min at {args.rate}/s, a fault every {args.fault_every}s")
        while time.monotonic() < end:
            event_id = f"soak-{i:08d}"
            for _ in range(600):
                try:
                    await c.publish("load", "tick", {"i": i}, id=event_id, timeout=2)
                    break
                except MeshError:
                    await asyncio.sleep(0.1)
            else:
                print(f"could not publish {event_id}")
                return 1
            published.append(event_id)
            i += 1
            now = time.monotonic()
            if now >= next_fault:
                what = faults[0]
                faults.append(faults.pop(0))  # broker, egress, sink in turn
                print(f"[{now - t0:7.0f}s] SIGKILL {what} (published {len(published)})")
                if what == "broker":
                    broker.kill()
                    await asyncio.sleep(1)
                    broker.start()
                else:
                    services[what].kill()
                    await asyncio.sleep(1)
                    services[what].start()
                next_fault = now + args.fault_every
            if now >= next_sample:
                for name, svc in services.items():
                    mb = svc.rss_mb()
                    if mb is not None:
                        rss[name].append(mb)
                next_sample = now + 10
            delay = t0 + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

        print(f"published {len(published)}; draining ...")
        deadline = time.monotonic() + args.drain_timeout
        want = set(published)
        while time.monotonic() < deadline and not want <= set(ok_ids):
            await asyncio.sleep(1)
        store = await open_store(settings.db_url)
        rows = 0
        while time.monotonic() < deadline:
            rows = await store.count("events")
            if rows >= len(published):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(2)
        rows = await store.count("events")
        await store.close()
        for s in services.values():
            s.stop()
    await runner.cleanup()
    broker.stop()

    lost = want - set(ok_ids)
    dups = sum(n - 1 for k, n in ok_ids.items() if k in want and n > 1)
    print(f"loss: {len(lost)} of {len(published)}")
    print(f"duplicates: {dups} receipts beyond the first ({dups / max(len(published), 1):.2%})")
    print(f"sink rows: {rows} (published {len(published)})")
    for name, samples in rss.items():
        if samples:
            print(
                f"RSS {name}: min {min(samples):.0f} MB, median {statistics.median(samples):.0f}"
                f" MB, max {max(samples):.0f} MB over {len(samples)} samples"
            )
    print(f"logs and data: {root}")
    return 0 if not lost and rows == len(published) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--rate", type=float, default=50, help="events per second")
    p.add_argument("--fault-every", type=float, default=120, help="seconds between faults")
    p.add_argument("--fail-ratio", type=float, default=0.05, help="receiver 503 ratio")
    p.add_argument("--drain-timeout", type=float, default=300)
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(main(p.parse_args())))
