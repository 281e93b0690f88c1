"""Tenants: fairness under a misbehaving tenant, and a mesh of many tenants.

    python -m bench tenants [--quick] [--rate R] [--seconds S] [--backlog N]
                            [--tenants N] [--skip-fairness] [--skip-scale]

Fairness: tenant A has one webhook target (a fast receiver) and publishes at a steady
``--rate``; tenant B has 20 webhook targets whose endpoint accepts the connection and
never answers (each request runs into its timeout), ``max_in_flight`` 64 each (1,280
requests wanted, over the egress's 512 slots) and a ``--backlog`` of events queued.
The figure is A's p99 publish-to-delivery latency with B misbehaving; its baseline, in
the same run, is A's p99 with B idle (B's targets registered, no events). Aim: within
2x. The egress runs as its own process (``mesh serve webhook-egress``).

Scale: ``--tenants`` tenants with 3 webhook targets each (and a propagation each):
time to register them, egress start-up until an event of the last tenant arrives, RSS
of each service process (egress, sink, api), and the egress's CPU per delivered event
against the same figure for a mesh of one tenant with 3 targets (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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
from bench.latency import measure, warm
from mesh.broker import free_port
from mesh.client import MeshClient
from mesh.registry import PropagationMode, Target, TargetKind
from mesh.subjects import qualify
from mesh.tenants import TenantStore

B_TARGETS = 20


async def blackhole(port: int) -> asyncio.Server:
    """Accepts connections and reads forever; never answers (every request times out)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        writer.close()

    return await asyncio.start_server(hold, "127.0.0.1", port)


async def _publish_backlog(c: MeshClient, source: str, n: int) -> None:
    done = 0
    while done < n:
        k = min(5000, n - done)
        await c.publish_many([c.build(source, "order.created", {"pad": PAD}) for _ in range(k)])
        done += k


async def fairness(args: argparse.Namespace, mesh: Scratch, c: MeshClient) -> list[Result]:
    rx_proc, port = start_receiver(mesh)
    rx = Receiver(port)
    await rx.wait_up()
    hole_port = free_port()
    hole = await blackhole(hole_port)
    tenants = await TenantStore.open(c.port, c.names.tenants)
    for t in ("ta", "tb"):
        await tenants.create(t)
    await c.add_target(Target(name="a-hook", kind=TargetKind.WEBHOOK, url=rx.url("a"), tenant="ta"))
    await c.registry.add_propagation(
        PropagationMode.UNIDIRECTIONAL, "shop", ["a-hook"], tenant="ta"
    )
    for i in range(B_TARGETS):
        await c.add_target(
            Target(
                name=f"b-hook-{i}",
                kind=TargetKind.WEBHOOK,
                url=f"http://127.0.0.1:{hole_port}/hook",
                tenant="tb",
                timeout_s=args.b_timeout,
                max_in_flight=64,
                circuit_threshold=1_000_000,  # never opens: the worst case, timeouts only
            )
        )
    await c.registry.add_propagation(PropagationMode.BROADCAST, "shop", tenant="tb")
    await c.provisioner.reconcile_all()
    a_source = qualify("ta", "shop")
    egress = start_egress(mesh, MESH_EGRESS_TENANT_SHARE=str(args.share))
    out: list[Result] = []
    try:
        await warm(c, rx, a_source)
        idle, _ = await measure(c, rx, a_source, args.rate, args.seconds)
        await _publish_backlog(c, qualify("tb", "shop"), args.backlog)
        await asyncio.sleep(max(2.0, args.b_timeout / 2))  # B's requests are on the wire
        busy, lag = await measure(c, rx, a_source, args.rate, args.seconds)
        note = f"{len(busy)} events of A at {args.rate:g}/s; B: {B_TARGETS} targets timing out"
        note += f" after {args.b_timeout:g}s, {args.backlog} events queued; share {args.share:g}"
        if lag > 0.5:
            note += f"; publisher {lag:.1f}s behind"
        for q in (50, 99):
            out.append(
                report(
                    Result(
                        "tenants",
                        f"A p{q} with B failing",
                        pct(busy, q),
                        "ms",
                        pct(idle, q),
                        "A with B idle",
                        "<= 2x" if q == 99 else "",
                        higher_is_better=False,
                        note=note if q == 99 else "",
                    )
                )
            )
    finally:
        stop_process(egress)
        hole.close()
        stop_process(rx_proc)
        await rx.close()
    return out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve(mesh: Scratch, name: str) -> subprocess.Popen[bytes]:
    log = open(mesh.tmp / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "serve", name],
        env=mesh.env(MESH_API_PORT=str(free_port())),
        stdout=subprocess.DEVNULL,
        stderr=log,
        cwd=str(ROOT),
    )
    log.close()
    mesh.procs.append(proc)
    return proc


async def _populate(c: MeshClient, n_tenants: int, url: str) -> float:
    start = time.monotonic()
    tenants = await TenantStore.open(c.port, c.names.tenants)
    for i in range(n_tenants):
        name = f"t{i:05d}"
        await tenants.create(name)
        for j in range(3):
            await c.registry.add_target(
                Target(name=f"{name}-h{j}", kind=TargetKind.WEBHOOK, url=url, tenant=name)
            )
        await c.registry.add_propagation(PropagationMode.BROADCAST, "app", tenant=name)
    await c.provisioner.reconcile_all()
    return time.monotonic() - start


async def _cpu_per_event(
    c: MeshClient,
    rx: Receiver,
    egress: subprocess.Popen[bytes],
    sources: list[str],
    n: int,
    wait_s: float | None = None,
) -> float:
    """Egress CPU seconds per delivery, over ``n`` events spread over ``sources``."""
    await rx.reset()
    before = _cpu_s(egress.pid)
    events = [c.build(sources[i % len(sources)], "x.y", {"pad": PAD}) for i in range(n)]
    await c.publish_many(events)
    await rx.wait_count(3 * n, timeout=wait_s or 120 + n / 20, proc=egress)
    return (_cpu_s(egress.pid) - before) / (3 * n) * 1e6


async def scale(args: argparse.Namespace) -> list[Result]:
    out: list[Result] = []
    figures: dict[int, dict[str, float]] = {}
    for n in (1, args.tenants):
        async with scratch_mesh() as mesh, mesh.client() as c:
            rx_proc, port = start_receiver(mesh)
            rx = Receiver(port)
            await rx.wait_up()
            f: dict[str, float] = {"register_s": await _populate(c, n, rx.url("t"))}
            t0 = time.monotonic()
            egress = start_egress(mesh)
            sink, api = _serve(mesh, "sink"), _serve(mesh, "api")
            last = qualify(f"t{n - 1:05d}", "app")
            await rx.reset()
            while True:  # until the last tenant's three targets get an event
                await c.publish(last, "warm.up", {})
                with contextlib.suppress(SystemExit):
                    await rx.wait_count(3, timeout=2, proc=egress)
                    break
                if time.monotonic() - t0 > 600:
                    raise SystemExit("the egress did not deliver within 600 s")
            f["startup_s"] = time.monotonic() - t0
            sources = [qualify(f"t{i:05d}", "app") for i in range(n)]
            f["cpu_us"] = await _cpu_per_event(c, rx, egress, sources, args.events, args.wait_s)
            await asyncio.sleep(1.0)
            for name, proc in (("egress", egress), ("sink", sink), ("api", api)):
                f[f"rss_{name}"] = _rss_mb(proc.pid)
            figures[n] = f
            for proc in (egress, sink, api, rx_proc):
                stop_process(proc)
            await rx.close()
    small, big = figures[1], figures[args.tenants]
    note = f"{args.tenants} tenants x 3 webhook targets; baseline 1 tenant x 3; shared machine"
    rows = [
        ("register tenants+targets", "register_s", "s", ""),
        ("egress start-up to delivery", "startup_s", "s", ""),
        ("egress CPU per delivery", "cpu_us", "us", ""),
        ("RSS egress", "rss_egress", "MB", ""),
        ("RSS sink", "rss_sink", "MB", ""),
        ("RSS api", "rss_api", "MB", ""),
    ]
    for i, (label, key, unit, aim) in enumerate(rows):
        out.append(
            report(
                Result(
                    "tenants",
                    f"{label} ({args.tenants} tenants)",
                    big[key],
                    unit,
                    small[key],
                    "1 tenant",
                    aim,
                    higher_is_better=False,
                    note=note if i == 0 else "",
                )
            )
        )
    return out


async def run(args: argparse.Namespace) -> list[Result]:
    if args.quick:
        args.seconds = args.seconds or 5.0
        args.backlog = args.backlog if args.backlog is not None else 5000
        args.tenants = args.tenants or 100
    args.seconds = args.seconds or 15.0
    args.backlog = 50_000 if args.backlog is None else args.backlog
    args.tenants = args.tenants or 1000
    out: list[Result] = []
    if not args.skip_fairness:
        header(
            f"tenants: A at {args.rate:g}/s while B has {B_TARGETS} endpoints timing out"
            f" and {args.backlog} events queued; egress in its own process"
        )
        async with scratch_mesh() as mesh, mesh.client() as c:
            out += await fairness(args, mesh, c)
    if not args.skip_scale:
        header(f"tenants: {args.tenants} tenants x 3 targets against 1 tenant x 3")
        out += await scale(args)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=100.0, help="A's events/s")
    p.add_argument("--seconds", type=float, default=None, help="seconds A publishes, per phase")
    p.add_argument("--backlog", type=int, default=None, help="events queued for B")
    p.add_argument("--b-timeout", type=float, default=10.0, help="B's targets' timeout_s")
    p.add_argument("--share", type=float, default=0.5, help="MESH_EGRESS_TENANT_SHARE")
    p.add_argument("--tenants", type=int, default=None, help="tenants in the scale part")
    p.add_argument("--events", type=int, default=1000, help="events for the CPU figure")
    p.add_argument(
        "--wait-s", type=float, default=None, help="how long the CPU part waits (a loaded machine)"
    )
    p.add_argument("--skip-fairness", action="store_true")
    p.add_argument("--skip-scale", action="store_true")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
