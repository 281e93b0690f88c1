"""Multicast fan-out: total webhook deliveries/s to 1, 10 and 50 targets.

    python -m bench fanout [--quick] [--targets 1,10,50] [--deliveries D]

One egress process (``mesh serve webhook-egress``) runs throughout; for each N a
multicast propagation from a fresh source to N fresh webhook targets (one path each on
one receiver process) is added, a delivery to every target is awaited (the workers are
up), then D/N events are published at once and the clock runs from the first to the
last arrival of the N x D/N deliveries. The targets are removed before the next N.

The figure for N targets is total deliveries/s; its baseline is the single-target rate
of the same run (N = 1), whose own baseline is raw aiohttp POSTs to the same receiver at
the same concurrency. The stream stores each event once; the server fans it out to N
consumers, the egress decrypts and signs N times.
"""

from __future__ import annotations

import argparse
import asyncio
import time

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
from mesh.client import MeshClient
from mesh.registry import Target, TargetKind

IN_FLIGHT = 32  # per target


async def wait_targets(rx: Receiver, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = (await rx.stats())["counts"]
        if all(counts.get(n, 0) >= 1 for n in names):
            return
        if time.monotonic() > deadline:
            missing = [n for n in names if not counts.get(n)]
            raise SystemExit(f"targets never delivered to: {', '.join(missing[:5])}")
        await asyncio.sleep(0.1)


async def one_round(c: MeshClient, rx: Receiver, n: int, events: int) -> float:
    source = f"fan{n}"
    names = [f"{source}-t{i}" for i in range(n)]
    for name in names:
        await c.add_target(
            Target(name=name, kind=TargetKind.WEBHOOK, url=rx.url(name), max_in_flight=IN_FLIGHT)
        )
    await c.add_propagation("multicast", source, names)
    try:
        await rx.reset()
        # The egress picks the targets up from the registry watch; one event each first.
        deadline = time.monotonic() + 60
        warmups = 0
        while True:
            await c.publish(source, "warm.up", {})
            warmups += 1
            try:
                await wait_targets(rx, names, timeout=3)
                break
            except SystemExit:
                if time.monotonic() > deadline:
                    raise
        await rx.wait_count(n * warmups, timeout=30)
        await rx.reset()
        batch = [c.build(source, "order.created", {"i": i, "pad": PAD}) for i in range(events)]
        await c.publish_many(batch)
        st = await rx.wait_count(n * events, timeout=120 + n * events / 200)
        return rate_between(st["count"], st["first"], st["last"])
    finally:
        for name in names:
            await c.remove_target(name)


async def run(args: argparse.Namespace) -> list[Result]:
    ns = [int(x) for x in args.targets.split(",")]
    deliveries = args.deliveries or (4_000 if args.quick else 20_000)
    header(
        f"fanout: multicast to {', '.join(map(str, ns))} webhook targets, ~{deliveries:,}"
        f" deliveries per N, {IN_FLIGHT} in flight per target; egress and receiver in their"
        " own processes"
    )
    out: list[Result] = []
    async with scratch_mesh() as mesh, mesh.client() as c:
        rx_proc, port = start_receiver(mesh)
        rx = Receiver(port)
        await rx.wait_up()
        raw = await raw_posts(rx.url("raw"), deliveries, IN_FLIGHT)
        egress = start_egress(mesh, profile=args.profile)
        rates: dict[int, float] = {}
        try:
            for n in ns:
                rates[n] = await one_round(c, rx, n, max(50, deliveries // n))
                base = rates.get(1)
                if n == 1:
                    res = Result(
                        "fanout", "1 target", rates[1], "deliv/s", raw, "POSTs", note="per target"
                    )
                else:
                    res = Result(
                        "fanout",
                        f"{n} targets (total)",
                        rates[n],
                        "deliv/s",
                        base,
                        "1 target",
                        ">= 0.7" if n == 10 else "",
                    )
                out.append(report(res))
        finally:
            stop_process(egress)
            stop_process(rx_proc)
            await rx.close()
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile", action="store_true", help="run the egress under pyinstrument, print its report"
    )
    p.add_argument("--targets", default="1,10,50", help="comma-separated N values")
    p.add_argument("--deliveries", type=int, default=None, help="deliveries per N")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
