"""A large backlog for a target whose receiver is down: egress memory, then drain rate.

    python -m bench backlog [--quick] [--events N] [--down S]

1. Baseline memory: an egress process with nothing to do, its RSS after start-up.
2. A webhook target pointing at a closed port (the receiver is down) gets N events
   (200,000; 20,000 with ``--quick``) published while no egress runs.
3. The egress starts (its own process) and faces the backlog with the receiver down for
   ``--down`` seconds: it fetches, fails, retries, its circuit opens.
4. The receiver comes up on that port; the circuit's next probe succeeds and the
   backlog drains. Drain rate = unique deliveries / (last arrival - first arrival).

RSS of the egress is sampled (psutil) every 100 ms from its start to the last delivery;
the figure is the peak. The drain rate's baseline is raw aiohttp POSTs to the same
receiver at the same concurrency, in the same run. The target's retry policy is short
(base 0.05 s, 100 retries) and its circuit opens for 1 s, so that the drain starts
soon after the receiver is back; nothing may end in the dead-letter queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import psutil

from bench._common import (
    PAD,
    Receiver,
    Result,
    header,
    rate_between,
    raw_posts,
    report,
    scratch_mesh,
    start_egress,
    start_receiver,
    stop_process,
)
from mesh.broker import free_port
from mesh.registry import RetryPolicy, Target, TargetKind

IN_FLIGHT = 64


class RssSampler:
    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                rss = self.proc.memory_info().rss
                self.samples.append(rss)
                self.peak = max(self.peak, rss)
            await asyncio.sleep(self.every)

    def start(self) -> RssSampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def run(args: argparse.Namespace) -> list[Result]:
    n = args.events or (20_000 if args.quick else 200_000)
    down = args.down if args.down is not None else (3.0 if args.quick else 10.0)
    header(
        f"backlog: {n:,} events for a webhook target whose receiver is down for {down:g}s,"
        f" then up; {IN_FLIGHT} in flight; egress in its own process"
    )
    MB = 1024 * 1024
    async with scratch_mesh() as mesh, mesh.client() as c:
        # 1. An idle egress: the memory baseline.
        idle = start_egress(mesh)
        sampler = RssSampler(idle.pid).start()
        await asyncio.sleep(4.0)
        await sampler.stop()
        idle_rss = max(sampler.samples[-10:]) if sampler.samples else 0
        stop_process(idle)

        # 2. The backlog, for a receiver that is not there.
        port = free_port()
        rx = Receiver(port)
        await c.add_target(
            Target(
                name="backlog",
                kind=TargetKind.WEBHOOK,
                url=rx.url("backlog"),
                max_in_flight=IN_FLIGHT,
                timeout_s=5,
                retry=RetryPolicy(base_s=0.05, max_delay_s=1.0, max_retries=100),
                circuit_open_s=1.0,
            )
        )
        await c.add_propagation("unidirectional", "shop", ["backlog"])
        started = time.perf_counter()
        chunk = 5_000
        for first in range(0, n, chunk):
            events = [
                c.build("shop", "order.created", {"i": i, "pad": PAD})
                for i in range(first, min(n, first + chunk))
            ]
            await c.publish_many(events)
        print(f"  ({n:,} events published in {time.perf_counter() - started:.1f}s)", flush=True)

        # 3. The egress faces it with the receiver down.
        egress = start_egress(mesh, profile=args.profile)
        sampler = RssSampler(egress.pid).start()
        try:
            await asyncio.sleep(down)
            down_peak = sampler.peak
            # 4. The receiver comes up; the backlog drains.
            rx_proc, _ = start_receiver(mesh, port)
            await rx.wait_up()
            deadline = time.monotonic() + 120 + n / 200
            while True:
                st = await rx.stats()
                if st["unique"] >= n:
                    break
                if egress.poll() is not None:
                    raise SystemExit(f"the egress exited with {st['unique']}/{n} delivered")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{st['unique']} of {n} delivered in time")
                await asyncio.sleep(0.2)
            await sampler.stop()
            drain = rate_between(st["unique"], st["first"], st["last"])
            dlq = (await c.js.stream_info(c.names.dlq)).state.messages
            dups = st["count"] - st["unique"]
        finally:
            await sampler.stop()
            stop_process(egress)
        raw = await raw_posts(rx.url("raw"), min(n, 20_000), IN_FLIGHT)
        stop_process(rx_proc)
        await rx.close()
    note = f"dead letters {dlq}, duplicates {dups}"
    if args.profile:
        note += "; profiled: RSS and rate not representative"
    return [
        report(
            Result(
                "backlog",
                f"egress peak RSS, {n:,} backlog",
                sampler.peak / MB,
                "MB",
                idle_rss / MB,
                "idle egress",
                "< 200 MB",
                higher_is_better=False,
                note=f"peak while receiver down {down_peak / MB:.0f} MB",
            )
        ),
        report(Result("backlog", "drain rate", drain, "deliv/s", raw, "POSTs", note=note)),
    ]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", action="store_true", help="run the egress under pyinstrument, print its report"
    )
    p.add_argument("--events", type=int, default=None, help="backlog size")
    p.add_argument("--down", type=float, default=None, help="seconds with the receiver down")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
