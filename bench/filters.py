"""Filters and transforms: webhook delivery rate with a 5-clause CESQL filter and a
JMESPath transform, against the same target shape with neither.

    python -m bench filters [--quick] [--events N] [--pairs P]

One egress process (``mesh serve webhook-egress``) runs throughout. Each round adds a
fresh source and webhook target with a unidirectional propagation, either plain or with
``--filter`` (five clauses over attributes and data, all true for the events sent) and
``--transform`` (a five-field reshape), waits for a first delivery (the worker is up),
then publishes N events at once and times the first to the last arrival. Rounds
alternate plain / filtered P times; the figure is the median filtered rate and the ratio
is the median of each pair's filtered/plain ratio (pairs run back to back, so machine
noise hits both sides alike). Every event passes the filter: the cost measured is the
evaluation and the reshaping, not fewer deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench._common import (
    PAD,
    Receiver,
    Result,
    header,
    rate_between,
    report,
    scratch_mesh,
    start_egress,
    start_receiver,
    stop_process,
)
from mesh.client import MeshClient
from mesh.registry import Target, TargetKind

IN_FLIGHT = 32
FILTER = (
    "type = 'order.created' AND data.total > 100 AND data.customer.tier IN ('gold', 'plus')"
    " AND source LIKE 'flt%' AND EXISTS data.items"
)
TRANSFORM = "{id: i, total: total, tier: customer.tier, items: length(items), pad: pad}"


async def one_round(c: MeshClient, rx: Receiver, tag: str, events: int, filtered: bool) -> float:
    source, name = f"flt{tag}", f"flt{tag}-t"
    await c.add_target(
        Target(name=name, kind=TargetKind.WEBHOOK, url=rx.url(name), max_in_flight=IN_FLIGHT)
    )
    await c.add_propagation(
        "unidirectional",
        source,
        [name],
        filter=FILTER if filtered else None,
        transform=TRANSFORM if filtered else None,
    )
    doc = {"total": 150, "customer": {"tier": "gold", "since": 2019}, "items": [1, 2, 3]}
    try:
        await rx.reset()
        deadline = time.monotonic() + 60
        while True:
            await c.publish(source, "order.created", {"i": -1, "pad": PAD, **doc})
            await asyncio.sleep(0.5)
            if (await rx.stats())["counts"].get(name):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"target {name} never delivered to")
        await asyncio.sleep(0.5)
        await rx.reset()
        batch = [
            c.build(source, "order.created", {"i": i, "pad": PAD, **doc}) for i in range(events)
        ]
        await c.publish_many(batch)
        st = await rx.wait_count(events, timeout=120 + events / 200)
        return rate_between(st["count"], st["first"], st["last"])
    finally:
        await c.remove_target(name)


async def run(args: argparse.Namespace) -> list[Result]:
    events = args.events or (3_000 if args.quick else 10_000)
    pairs = args.pairs or (2 if args.quick else 3)
    header(
        f"filters: {events:,} webhook deliveries per round, {pairs} plain/filtered pairs,"
        f" {IN_FLIGHT} in flight; 5-clause CESQL filter + JMESPath transform vs neither"
    )
    async with scratch_mesh() as mesh, mesh.client() as c:
        rx_proc, port = start_receiver(mesh)
        rx = Receiver(port)
        await rx.wait_up()
        egress = start_egress(mesh)
        plain: list[float] = []
        shaped: list[float] = []
        try:
            for k in range(pairs):
                plain.append(await one_round(c, rx, f"p{k}", events, False))
                shaped.append(await one_round(c, rx, f"f{k}", events, True))
        finally:
            stop_process(egress)
            stop_process(rx_proc)
            await rx.close()
    ratios = [s / p for s, p in zip(shaped, plain, strict=True)]
    res = Result(
        "filters",
        "filter + transform",
        statistics.median(shaped),
        "deliv/s",
        statistics.median(plain),
        "no filter",
        ">= 0.85",
        reported_ratio=statistics.median(ratios),
        note="pairs " + ", ".join(f"{r:.2f}" for r in ratios),
    )
    return [report(res)]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=None, help="events per round")
    p.add_argument("--pairs", type=int, default=None, help="plain/filtered round pairs")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
