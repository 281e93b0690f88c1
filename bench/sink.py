"""Sink throughput: events/s from JetStream into SQLite and PostgreSQL, against a raw baseline.

The baseline is a durable pull consumer that fetches the same messages with
the same batch size and acks each one, doing nothing else: the most any
consumer can get out of this broker on this machine. The ratio says how much
of that the sink keeps while decoding, writing one transaction per batch and
acking after commit.

    .venv/bin/python bench/sink.py                       # SQLite only
    MESH_TEST_PG_DSN=postgresql://postgres@127.0.0.1:5432/test .venv/bin/python bench/sink.py
    .venv/bin/python bench/sink.py --events 50000 --batch 500 --payload 512

It starts its own nats-server on a free port, in a temporary directory; a
PostgreSQL run uses a scratch schema and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats.errors as nats_errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.observability import configure_logging
from mesh.storage import Table, open_store
from services.sink import Sink


async def publish(client: MeshClient, n: int, payload: int) -> None:
    blob = secrets.token_hex(payload // 2)
    chunk = 5000
    for start in range(0, n, chunk):
        events = [
            client.build("bench", "order.created", {"n": i, "blob": blob})
            for i in range(start, min(start + chunk, n))
        ]
        await client.publish_many(events, window=1000)


async def raw_baseline(client: MeshClient, n: int, batch: int) -> float:
    """Fetch-and-ack every message through a fresh durable consumer; events/s."""
    stream = client.names.events
    name = f"bench-raw-{secrets.token_hex(3)}"
    await client.js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=60,
            max_ack_pending=max(batch * 8, 1000),
        ),
    )
    sub = await client.js.pull_subscribe_bind(name, stream=stream)
    got = 0
    started = time.perf_counter()
    while got < n:
        try:
            msgs = await sub.fetch(batch, timeout=0.5)
        except (nats_errors.TimeoutError, TimeoutError):
            continue
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await client.nc.flush()
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    await client.js.delete_consumer(stream, name)
    return n / elapsed


async def through_sink(
    settings: Settings, client: MeshClient, db_url: str, n: int, batch: int
) -> float:
    """Run a Sink from an empty table until it holds every event; events/s."""
    for consumer, stream in (
        ("sink-events", client.names.events),
        ("sink-sys", client.names.sys),
        ("sink-dlq", client.names.dlq),
    ):
        with contextlib.suppress(Exception):
            await client.js.delete_consumer(stream, consumer)
    store = await open_store(db_url)
    await store.migrate()
    await store.close()
    sink = Sink(settings.model_copy(update={"db_url": db_url}), batch_size=batch)
    # Timed from the first fetch, like the baseline: connecting is not throughput.
    await sink.start()
    started = time.perf_counter()
    try:
        while sink.counts["events"] < n:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        await sink.stop()
    async with await open_store(db_url) as check:
        stored = await check.count(Table.EVENTS)
    if stored != n:
        raise SystemExit(f"the sink stored {stored} rows, expected {n}")
    return n / elapsed


@contextlib.asynccontextmanager
async def pg_scratch(dsn: str):
    import asyncpg

    schema = f"bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    sep = "&" if "?" in dsn else "?"
    try:
        yield f"{dsn}{sep}search_path={schema}"
    finally:
        conn = await asyncpg.connect(dsn)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--payload", type=int, default=256, help="bytes of data per event")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--pg", default=os.environ.get("MESH_TEST_PG_DSN"), help="PostgreSQL DSN")
    args = parser.parse_args()
    configure_logging("console", "warning")

    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        home = Path(tmp)
        broker = EmbeddedBroker(home / "nats", port=free_port(), log_file=home / "nats.log")
        broker.start()
        try:
            settings = Settings(home=home / "home", nats_url=broker.url, heartbeat_interval_s=5)
            async with MeshClient(settings, name="bench") as client:
                await client.init()
                t0 = time.perf_counter()
                await publish(client, args.events, args.payload)
                print(
                    f"{args.events} encrypted events of ~{args.payload} B data published in"
                    f" {time.perf_counter() - t0:.1f}s; batch size {args.batch};"
                    f" {args.repeat} rounds, medians"
                )
                rates: dict[str, list[float]] = {"raw": [], "sqlite": [], "postgresql": []}
                ratios: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
                for round_ in range(args.repeat):
                    # Each sink run right after its own baseline on the same messages and
                    # batch size: this machine's load drifts, so ratios are taken in pairs.
                    backends = [("sqlite", f"sqlite:///{home / f'bench-{round_}.db'}")]
                    if args.pg:
                        backends.append(("postgresql", ""))
                    for key, url in backends:
                        raw = await raw_baseline(client, args.events, args.batch)
                        rates["raw"].append(raw)
                        async with (
                            pg_scratch(args.pg) if key == "postgresql" else _given(url)
                        ) as db_url:
                            rate = await through_sink(
                                settings, client, db_url, args.events, args.batch
                            )
                        rates[key].append(rate)
                        ratios[key].append(rate / raw)
        finally:
            broker.stop()

    raw = statistics.median(rates["raw"])
    print(f"{'raw fetch+ack':<26} {raw:>9,.0f} events/s   {_runs(rates['raw'])}")
    for label, key in (("sink -> sqlite (WAL)", "sqlite"), ("sink -> postgresql", "postgresql")):
        if not rates[key]:
            print(f"{label:<26} skipped (set MESH_TEST_PG_DSN or --pg)")
            continue
        rate = statistics.median(rates[key])
        ratio = statistics.median(ratios[key])
        print(
            f"{label:<26} {rate:>9,.0f} events/s   ratio {ratio:.2f} (median of pairs,"
            f" {min(ratios[key]):.2f}-{max(ratios[key]):.2f})   {_runs(rates[key])}"
        )


@contextlib.asynccontextmanager
async def _given(url: str):
    yield url


def _runs(values: list[float]) -> str:
    return "runs: " + ", ".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    asyncio.run(main())
