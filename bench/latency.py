"""Publish-to-webhook-receipt latency through the real egress, against a raw relay.

    python -m bench latency [--quick] [--rates 100,1000] [--seconds S]

The egress runs as its own process (``mesh serve webhook-egress``), the receiver too
(an aiohttp server recording each request's arrival by ``webhook-id``). Events are
published at a steady rate, each at its due time (not awaited one after the other, so a
slow acknowledgement does not delay the next event); the latency of an event is its
arrival at the receiver minus the moment just before its publish (one clock: same
machine).

The raw baseline, in the same run, is the least any relay can do: a process that
pulls the same stream with nats.py (``fetch`` of a durable pull consumer), POSTs each
message's body as it is to the same receiver and acks: no decryption, no decoding, no
routing check, no signing, no delivery records, no retry bookkeeping. Its events are the
same encrypted events, published the same way under another source.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time

from bench._common import (
    PAD,
    ROOT,
    Receiver,
    Result,
    Scratch,
    header,
    pct,
    report,
    scratch_mesh,
    start_egress,
    start_receiver,
    stop_process,
)
from mesh.client import MeshClient
from mesh.registry import Target, TargetKind

RELAY_CONSUMER = "bench-relay"


async def steady(
    c: MeshClient, source: str, rate: float, seconds: float
) -> tuple[dict[str, float], float]:
    """Publish at ``rate``/s for ``seconds``; returns event id -> send time, and the lag
    of the publisher behind its schedule at the end (s)."""
    sent: dict[str, float] = {}
    total = int(rate * seconds)
    tasks: set[asyncio.Task[bool]] = set()
    start = time.monotonic()
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        event = c.build(source, "order.created", {"i": i, "pad": PAD})
        sent[event.id] = time.time()
        task = asyncio.create_task(c.publish_event(event))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    lag = time.monotonic() - (start + (total - 1) / rate)
    if tasks:
        await asyncio.gather(*tasks)
    return sent, lag


async def measure(
    c: MeshClient, rx: Receiver, source: str, rate: float, seconds: float
) -> tuple[list[float], float]:
    await rx.reset()
    sent, lag = await steady(c, source, rate, seconds)
    await rx.wait_count(len(sent), timeout=60 + seconds)
    arrivals = await rx.arrivals()
    lat = [(arrivals[i] - t) * 1000 for i, t in sent.items() if i in arrivals]
    if len(lat) != len(sent):
        raise SystemExit(f"{len(sent) - len(lat)} events never arrived")
    return lat, lag


async def warm(c: MeshClient, rx: Receiver, source: str) -> None:
    """Until an event gets through (the consumer is up and delivering)."""
    await rx.reset()
    deadline = time.monotonic() + 60
    while True:
        await c.publish(source, "warm.up", {})
        with contextlib.suppress(SystemExit):
            await rx.wait_count(1, timeout=2)
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing from {source} reached the receiver")
    await asyncio.sleep(0.5)


def start_relay(mesh: Scratch, url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.latency",
            "--relay",
            mesh.settings.nats_url or "",
            mesh.settings.prefix.upper() + "_EVENTS",
            url,
        ],
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=open(mesh.tmp / "relay.log", "ab"),  # noqa: SIM115
    )
    mesh.procs.append(proc)
    return proc


async def run_relay(nats_url: str, stream: str, url: str) -> None:
    """The raw relay: fetch, POST the body as it is, ack. Nothing else."""
    import aiohttp
    import nats
    import nats.errors
    from nats.aio.msg import Msg

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(RELAY_CONSUMER, stream=stream)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    slots = asyncio.Semaphore(64)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

        async def one(msg: Msg) -> None:
            headers = {
                "webhook-id": (msg.headers or {}).get("Nats-Msg-Id", ""),
                "content-type": "application/octet-stream",
            }
            async with http.post(url, data=msg.data, headers=headers) as resp:
                await resp.read()
            await msg.ack()
            slots.release()

        while not stop.is_set():
            await slots.acquire()
            slots.release()
            try:
                msgs = await sub.fetch(32, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in msgs:
                await slots.acquire()
                task = asyncio.create_task(one(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    await nc.close()


async def run(args: argparse.Namespace) -> list[Result]:
    rates = [float(r) for r in args.rates.split(",")]
    seconds = args.seconds
    header(
        f"latency: publish -> webhook receipt at {', '.join(f'{r:g}' for r in rates)} events/s,"
        f" {'per-rate seconds ' + str(seconds) if seconds else 'quick' if args.quick else 'full'};"
        " egress and receiver in their own processes"
    )
    out: list[Result] = []
    async with scratch_mesh() as mesh, mesh.client() as c:
        rx_proc, port = start_receiver(mesh)
        rx = Receiver(port)
        await rx.wait_up()
        await c.add_target(
            Target(name="bench", kind=TargetKind.WEBHOOK, url=rx.url("bench"), max_in_flight=64)
        )
        await c.add_propagation("unidirectional", "shop", ["bench"])
        # The relay's own durable consumer on the same stream, for another source.
        from nats.js.api import AckPolicy, ConsumerConfig

        await c.js.add_consumer(
            c.names.events,
            ConsumerConfig(
                durable_name=RELAY_CONSUMER,
                filter_subject=c.subjects.evt_filter("relay"),
                ack_policy=AckPolicy.EXPLICIT,
                max_ack_pending=1000,
            ),
        )

        def secs(rate: float) -> float:
            if seconds:
                return float(seconds)
            # Enough events for a p99.9 (>= 1000) in the full run.
            if args.quick:
                return 6.0 if rate <= 100 else 3.0
            return 20.0 if rate <= 100 else 10.0

        raw: dict[float, list[float]] = {}
        relay = start_relay(mesh, rx.url("relay"))
        try:
            await warm(c, rx, "relay")
            for rate in rates:
                raw[rate], _ = await measure(c, rx, "relay", rate, secs(rate))
        finally:
            stop_process(relay)
        egress = start_egress(mesh)
        try:
            await warm(c, rx, "shop")
            for rate in rates:
                lat, lag = await measure(c, rx, "shop", rate, secs(rate))
                note = f"{len(lat)} events"
                if lag > 0.5:
                    note += f"; publisher {lag:.1f}s behind"
                for q, aim in ((50, ""), (99, "< 20 ms" if rate <= 100 else ""), (99.9, "")):
                    out.append(
                        report(
                            Result(
                                "latency",
                                f"p{q:g} at {rate:g}/s",
                                pct(lat, q),
                                "ms",
                                pct(raw[rate], q),
                                "relay",
                                aim,
                                higher_is_better=False,
                                note=note if q == 50 else "",
                            )
                        )
                    )
        finally:
            stop_process(egress)
        stop_process(rx_proc)
        await rx.close()
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default="100,1000", help="comma-separated events/s")
    p.add_argument("--seconds", type=float, default=None, help="seconds per rate")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--relay"]:
        asyncio.run(run_relay(*argv[1:4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
