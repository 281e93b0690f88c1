"""Publish throughput: MeshClient against raw nats-py JetStream, same bodies, same stream.

    python -m bench publish [--quick] [--events N] [--rounds R] [--sync always|lazy|both]

Three pairs, alternated within each round (medians over the rounds are reported):

1. sequential: ``MeshClient.publish`` awaited one by one, against raw ``js.publish``
   awaited one by one;
2. pipelined: ``MeshClient.publish_many`` against raw ``js.publish_async`` of every
   message then ``publish_async_completed()``;
3. the command: ``mesh publish --count N`` (its own process; the time of a
   ``--count 1`` run is subtracted, so start-up does not count) against the raw
   pipelined rate.

The raw messages are what the mesh would send: the same subject, the same ``ce-*``
headers and the same encrypted body (encoded once, before the clock starts), each with
its own ``Nats-Msg-Id``; the raw side does no per-message work of its own. The ratio is
the share of the broker's raw rate the mesh keeps while building, encoding and
encrypting each event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench._common import PAD, Result, Scratch, header, report, scratch_mesh
from mesh.client import MeshClient
from mesh.durability import SyncMode


def _data(i: int) -> dict[str, Any]:
    return {"i": i, "pad": PAD}


def _raw_messages(c: MeshClient, n: int) -> list[tuple[str, dict[str, str], bytes]]:
    out = []
    for i in range(n):
        event = c.build("shop", "order.created", _data(i))
        subject = c.subjects.evt(event.source, event.type)
        headers, body = c._message(event, subject)
        out.append((subject, headers, body))
    return out


async def seq_mesh(c: MeshClient, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        await c.publish("shop", "order.created", _data(i))
    return n / (time.perf_counter() - started)


async def seq_raw(c: MeshClient, n: int) -> float:
    msgs = _raw_messages(c, n)
    js = c.js
    started = time.perf_counter()
    for subject, headers, body in msgs:
        await js.publish(subject, body, headers=headers, timeout=5)
    return n / (time.perf_counter() - started)


async def many_mesh(c: MeshClient, n: int) -> float:
    started = time.perf_counter()
    events = [c.build("shop", "order.created", _data(i)) for i in range(n)]
    new = await c.publish_many(events)
    elapsed = time.perf_counter() - started
    if new != n:
        raise SystemExit(f"publish_many stored {new} of {n}")
    return n / elapsed


async def many_raw(c: MeshClient, n: int) -> float:
    msgs = _raw_messages(c, n)
    js = c.js
    started = time.perf_counter()
    for subject, headers, body in msgs:
        # A broker that fsyncs every message (sync always) on a busy disk acks slowly.
        await js.publish_async(subject, body, headers=headers, wait_stall=120)
    await js.publish_async_completed()
    return n / (time.perf_counter() - started)


def cli_seconds(mesh: Scratch, n: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "mesh.cli",
        "publish",
        "--source",
        "shop",
        "--type",
        "order.created",
        "--data",
        json.dumps(_data(0)),
        "--count",
        str(n),
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=mesh.env(), capture_output=True, timeout=300)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"mesh publish failed: {proc.stderr.decode()[-400:]}")
    return elapsed


async def measure(args: argparse.Namespace, sync: SyncMode) -> tuple[dict[str, float], float]:
    """Medians of every rate on a broker in ``sync`` mode, and the CLI's start-up time."""
    n_seq = args.events_seq or (2_000 if args.quick else 10_000)
    n_many = args.events or (10_000 if args.quick else 50_000)
    rounds = args.rounds or (2 if args.quick else 3)
    header(
        f"publish: sequential {n_seq:,}, pipelined {n_many:,} events of ~250 B data,"
        f" encrypted; {rounds} rounds, medians; broker sync {sync}"
    )
    rates: dict[str, list[float]] = {k: [] for k in ("sm", "sr", "mm", "mr", "cli")}
    async with scratch_mesh(sync=sync) as mesh, mesh.client() as c:
        await c.publish("shop", "warm.up", {})
        await many_raw(c, 500)
        for _ in range(rounds):
            rates["sr"].append(await seq_raw(c, n_seq))
            rates["sm"].append(await seq_mesh(c, n_seq))
            rates["mr"].append(await many_raw(c, n_many))
            rates["mm"].append(await many_mesh(c, n_many))
        one = min(cli_seconds(mesh, 1) for _ in range(2))
        for _ in range(rounds):
            t = cli_seconds(mesh, n_many)
            rates["cli"].append((n_many - 1) / max(1e-3, t - one))
    return {k: statistics.median(v) for k, v in rates.items()}, one


def report_mode(med: dict[str, float], one: float, label: str = "") -> list[Result]:
    return [
        report(
            Result(
                "publish", f"MeshClient.publish (awaited){label}", med["sm"], "events/s",
                med["sr"], "js.publish", ">= 0.7",
            )
        ),
        report(
            Result(
                "publish", f"MeshClient.publish_many{label}", med["mm"], "events/s",
                med["mr"], "publish_async", ">= 0.7",
            )
        ),
        report(
            Result(
                "publish", f"mesh publish --count{label}", med["cli"], "events/s",
                med["mr"], "publish_async", ">= 0.7",
                note=f"start-up {one:.2f}s excluded",
            )
        ),
    ]  # fmt: skip


async def run(args: argparse.Namespace) -> list[Result]:
    sync = getattr(args, "sync", "always")
    if sync != "both":
        return report_mode(*await measure(args, SyncMode(sync)))
    always, one = await measure(args, SyncMode.ALWAYS)
    results = report_mode(always, one)
    lazy, one_lazy = await measure(args, SyncMode.LAZY)
    results += report_mode(lazy, one_lazy, " [lazy]")
    header("publish: the cost of sync_interval: always (always against lazy, same run)")
    for key, name in (
        ("sm", "publish (awaited)"),
        ("mm", "publish_many"),
        ("sr", "raw js.publish"),
    ):
        results.append(
            report(
                Result(
                    "publish", f"{name}: always vs lazy", always[key], "events/s",
                    lazy[key], "lazy",
                )
            )
        )  # fmt: skip
    return results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=None, help="events per pipelined run")
    p.add_argument("--events-seq", type=int, default=None, help="events per sequential run")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--sync",
        choices=["always", "lazy", "both"],
        default="always",
        help="the broker's sync mode (MESH_BROKER_SYNC); both: each in turn, and the ratio",
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
