"""The egress against what a Python team would build instead, all in one run.

    python bench/peers.py [--quick] [--events N] [--concurrency C] [--rounds K]
                          [--work plain|mesh|both] [--only NAME,...]

Every sender delivers a backlog of N queued events to the same receiver process
(bench/egress.py's), at-least-once (the message is acked only after a 2xx), and is
measured the same way: deliveries/s from the receiver's first to last arrival, and the
CPU (user + system) per delivery of every process of the sender and of its broker.

- ``raw``: bench/egress.py's aiohttp POST loop, no queue at all (the limit).
- ``egress``: ``mesh serve webhook-egress`` (its own process), as bench/egress.py runs it.
- ``faststream``: a FastStream app (its own process): a JetStream pull subscriber with
  ``max_workers = C`` on a stream of its own in the same nats-server, POSTing with one
  aiohttp session, acked after the 2xx (``AckPolicy.NACK_ON_ERROR``), its per-message
  log lines off (``logger=None``) as the egress's are.
- ``celery-prefork`` / ``celery-threads``: a Celery 5 worker on the local Redis broker
  (``MESH_BENCH_REDIS_URL``, default redis://127.0.0.1:6379/14; the db is flushed before
  and after), ``acks_late``, a task POSTing with one httpx client per process; prefork
  with ``--prefork`` processes, threads with C threads.

The egress decrypts (Fernet), signs (Standard Webhooks) and records each attempt. The
peers run twice with ``--work both``: ``plain`` (the body as queued, no signature) and
``mesh`` (the queued message is a Fernet token, decrypted; the body signed with the
reference ``standardwebhooks`` library). Neither peer writes delivery records. Rounds
alternate the order of the senders; medians are printed.

Needs the ``bench`` extra (``pip install -e '.[bench]'``) and, for Celery, Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import egress as eg  # noqa: E402

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
FERNET_KEY = base64.urlsafe_b64encode(b"mesh-bench-fernet-key-0123456789").decode()  # bench only
STREAM, SUBJECT = "PEER", "peer.events"
REDIS_URL = os.environ.get("MESH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def event_body(i: int) -> bytes:
    return json.dumps(
        {"type": "order.created", "timestamp": "2025-01-01T00:00:00Z", "data": eg_data(i)},
        separators=(",", ":"),
    ).encode()


def eg_data(i: int) -> dict[str, Any]:
    return {"i": i, "pad": "x" * 200}


def queued_payload(i: int, work: bool) -> bytes:
    body = event_body(i)
    if not work:
        return body
    from cryptography.fernet import Fernet

    return Fernet(FERNET_KEY.encode()).encrypt(body)


class Deliverer:
    """The per-message work of a peer: the body and headers of one POST."""

    def __init__(self, work: bool) -> None:
        self.work = work
        if work:
            from cryptography.fernet import Fernet
            from standardwebhooks import Webhook

            self.fernet = Fernet(FERNET_KEY.encode())
            self.webhook = Webhook(SECRET)

    def request(self, event_id: str, payload: bytes) -> tuple[bytes, dict[str, str]]:
        headers = {"content-type": "application/json", "webhook-id": event_id}
        if not self.work:
            return payload, headers
        body = self.fernet.decrypt(payload)
        now = datetime.now(UTC)
        headers["webhook-timestamp"] = str(int(now.timestamp()))
        headers["webhook-signature"] = self.webhook.sign(event_id, now, body)
        return body, headers


# FastStream peer (its own process) ---------------------------------------------------


def run_faststream(nats_url: str, url: str, concurrency: int, work: bool) -> None:
    import aiohttp
    from faststream import AckPolicy
    from faststream.nats import JStream, NatsBroker, PullSub
    from faststream.nats.annotations import NatsMessage

    deliverer = Deliverer(work)
    # No per-message log lines: the egress runs at MESH_LOG_LEVEL=warning, Celery at warning.
    broker = NatsBroker(nats_url, logger=None)
    session: list[aiohttp.ClientSession] = []

    @broker.subscriber(
        SUBJECT,
        stream=JStream(STREAM, declare=False),
        durable="peer",
        pull_sub=PullSub(batch_size=concurrency, timeout=1.0),
        max_workers=concurrency,
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def handle(body: Any, message: NatsMessage) -> None:
        data, headers = deliverer.request(message.headers["webhook-id"], message.body)
        async with session[0].post(url, data=data, headers=headers) as resp:
            await resp.read()
            resp.raise_for_status()  # not a 2xx: nacked, delivered again

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=concurrency)
        session.append(aiohttp.ClientSession(connector=connector))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await broker.start()
        await stop.wait()
        await broker.stop()
        await session[0].close()

    asyncio.run(main())


async def faststream_round(
    nats_url: str, rx: eg.ReceiverClient, url: str, n: int, c: int, work: bool
) -> tuple[float, float, float]:
    import nats
    import psutil

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        with contextlib.suppress(Exception):  # not there yet
            await js.delete_stream(STREAM)
        await js.add_stream(name=STREAM, subjects=[SUBJECT])
        await rx.reset()
        for start in range(0, n, 500):
            acks = [
                js.publish(SUBJECT, queued_payload(i, work), headers={"webhook-id": f"fs-{i}"})
                for i in range(start, min(n, start + 500))
            ]
            await asyncio.gather(*acks)
    finally:
        await nc.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--faststream", nats_url, url, str(c), "1" if work else "0"
    )
    try:
        return await measure(rx, n, [psutil.Process(proc.pid)], eg.BROKER_PROC)
    finally:
        await eg.stop_process(proc)


# Celery peer (its own worker process or processes) ------------------------------------


def celery_app() -> Any:
    from celery import Celery

    app = Celery("meshpeer", broker=REDIS_URL)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app


app = celery_app() if os.environ.get("MESH_BENCH_CELERY") else None
if app is not None:
    _state: dict[str, Any] = {}

    @app.task(bind=True, name="peer.deliver", max_retries=None)  # type: ignore[untyped-decorator]
    def deliver(self: Any, event_id: str, payload: str) -> None:
        import httpx

        client = _state.get("client")
        if client is None:  # one per process (after the fork), shared by its threads
            limit = int(os.environ.get("MESH_BENCH_CONCURRENCY", "32"))
            client = _state["client"] = httpx.Client(
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
            )
            _state["deliverer"] = Deliverer(os.environ.get("MESH_BENCH_WORK") == "1")
        body, headers = _state["deliverer"].request(event_id, payload.encode())
        try:
            resp = client.post(os.environ["MESH_BENCH_URL"], content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self.retry(exc=exc, countdown=1) from exc
        if not 200 <= resp.status_code < 300:
            raise self.retry(countdown=1)


def redis_flush() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def redis_procs() -> list[Any]:
    import psutil

    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"]


async def celery_round(
    rx: eg.ReceiverClient, url: str, n: int, c: int, pool: str, prefork: int, work: bool
) -> tuple[float, float, float]:
    import psutil

    await rx.reset()
    redis_flush()
    env = {**os.environ, "MESH_BENCH_CELERY": "1", "MESH_BENCH_URL": url}
    env.update({"MESH_BENCH_WORK": "1" if work else "0", "MESH_BENCH_CONCURRENCY": str(c)})
    env["PYTHONPATH"] = str(ROOT)
    enqueue = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--enqueue", str(n), "1" if work else "0", env=env
    )
    if await enqueue.wait() != 0:
        raise SystemExit("enqueueing the Celery backlog failed")
    size = prefork if pool == "prefork" else c
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "celery", "-A", "bench.peers", "worker", "--pool", pool,
        "--concurrency", str(size), "--loglevel", "warning", "--without-gossip",
        "--without-mingle", "--without-heartbeat",
        env=env, cwd=str(ROOT), stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        main = psutil.Process(proc.pid)
        await rx.wait_count(1, timeout=60)
        procs = [main, *main.children(recursive=True)]
        return await measure(rx, n, procs, redis_procs(), started=True)
    finally:
        await eg.stop_process(proc)
        redis_flush()


def enqueue(n: int, work: bool) -> None:
    assert app is not None
    task = app.tasks["peer.deliver"]
    with app.producer_or_acquire() as producer:
        for i in range(n):
            task.apply_async((f"cy-{i}", queued_payload(i, work).decode()), producer=producer)


# Measuring ---------------------------------------------------------------------------


async def measure(
    rx: eg.ReceiverClient, n: int, procs: list[Any], broker: list[Any], started: bool = False
) -> tuple[float, float, float]:
    """(deliveries/s, sender CPU us per delivery, broker CPU us per delivery)."""
    if not started:
        await rx.wait_count(1, timeout=60)
    cpu0, b0 = eg._cpu_s(procs), eg._cpu_s(broker)
    first = (await rx.stats())["count"]
    st = await rx.wait_count(n, timeout=600)
    done = max(1, st["count"] - first)
    cpu, bcpu = (eg._cpu_s(procs) - cpu0) / done * 1e6, (eg._cpu_s(broker) - b0) / done * 1e6
    dups = st["count"] - len(st["arrivals"])
    if dups > 0:
        print(f"    ({dups} duplicate receipts, at-least-once)", flush=True)
    return eg.rate_of(st["arrivals"]), cpu, bcpu


async def run(args: argparse.Namespace) -> None:
    import psutil

    from mesh.broker import EmbeddedBroker, free_port
    from mesh.client import MeshClient
    from mesh.config import Settings
    from mesh.registry import Target, TargetKind

    tmp = Path(tempfile.mkdtemp(prefix="mesh-peers-"))
    broker = EmbeddedBroker(tmp / "nats", port=free_port(), log_file=tmp / "nats.log")
    await broker.astart()
    if broker.proc is not None:
        eg.BROKER_PROC[:] = [psutil.Process(broker.proc.pid)]
    rx_port = free_port()
    rx_proc = await asyncio.create_subprocess_exec(
        sys.executable, eg.__file__, "--receiver", str(rx_port)
    )
    eg.RECEIVER_PROC[:] = [psutil.Process(rx_proc.pid)]
    settings = Settings(home=tmp / "home", nats_url=broker.url, allow_private_targets=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_HOME": str(settings.home),
            "MESH_NATS_URL": broker.url,
            "MESH_ALLOW_PRIVATE_TARGETS": "1",
            "MESH_HTTP_PORT": str(free_port()),
            "MESH_LOG_LEVEL": "warning",
            "MESH_LOG_FORMAT": "json",
        }
    )
    rx = eg.ReceiverClient(rx_port)
    url = f"http://127.0.0.1:{rx_port}/hook"
    n, c = args.events, args.concurrency
    works = {"plain": [False], "mesh": [True], "both": [False, True]}[args.work]
    senders: list[tuple[str, bool]] = [("raw", False), ("egress", True)]
    for name in ("faststream", "celery-threads", "celery-prefork"):
        senders += [(name, w) for w in works]
    if args.only:
        keep = set(args.only.split(","))
        senders = [s for s in senders if s[0] in keep]
    figures: dict[str, list[tuple[float, float, float]]] = {}
    try:
        for _ in range(100):
            try:
                await rx.stats()
                break
            except Exception:  # not up yet
                await asyncio.sleep(0.05)
        async with MeshClient(settings, name="bench") as client:
            await client.init()
            await client.add_target(
                Target(name="bench", kind=TargetKind.WEBHOOK, url=url, max_in_flight=c)
            )
            await client.add_propagation("unidirectional", "shop", ["bench"])
            print(
                f"events={n} concurrency={c} rounds={args.rounds} celery prefork processes="
                f"{args.prefork}; {os.cpu_count()} CPUs (shared: other work may run)",
                flush=True,
            )
            for r in range(args.rounds):
                order = senders if r % 2 == 0 else senders[::-1]
                for name, work in order:
                    label = (
                        name
                        if name in ("raw", "egress")
                        else f"{name}+{'mesh' if work else 'plain'}"
                    )
                    if name == "raw":
                        rate = await eg.raw_throughput(rx, url, n, c)
                        fig = (rate, statistics.median(eg.CPU["raw"][-1:]), 0.0)
                    elif name == "egress":
                        before = len(eg.CPU.get("egress", []))
                        rate = await eg.egress_throughput(client, rx, env, settings, n, False, 1)
                        fig = (rate, eg.CPU["egress"][before], eg.CPU.get("broker", [0.0])[-1])
                    elif name == "faststream":
                        fig = await faststream_round(broker.url, rx, url, n, c, work)
                    else:
                        pool = name.split("-")[1]
                        fig = await celery_round(rx, url, n, c, pool, args.prefork, work)
                    figures.setdefault(label, []).append(fig)
                    print(
                        f"  round {r + 1} {label:24s} {fig[0]:7.0f}/s  sender {fig[1]:6.0f} us"
                        f"  broker {fig[2]:5.0f} us per delivery",
                        flush=True,
                    )
    finally:
        await eg.stop_process(rx_proc)
        await broker.astop()
        if any(s[0].startswith("celery") for s in senders):
            redis_flush()
    print("\nmedians (deliveries/s; CPU per delivery: sender processes, broker):")
    med = {
        k: tuple(statistics.median(f[i] for f in v) for i in range(3)) for k, v in figures.items()
    }
    for label, (rate, cpu, bcpu) in med.items():
        print(f"  {label:24s} {rate:8.0f}/s  sender {cpu:6.0f} us  broker {bcpu:5.0f} us")
    if "egress" in med:
        peers = {k: v for k, v in med.items() if k not in ("raw", "egress")}
        if peers:
            best = max(peers, key=lambda k: peers[k][0])
            print(
                f"egress / best peer ({best}): {med['egress'][0] / peers[best][0]:.2f}"
                "  (aim >= 1.5)"
            )
        if "raw" in med:
            print(f"egress / raw: {med['egress'][0] / med['raw'][0]:.2f}  (aim >= 0.8)")


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,000 events, one round")
    p.add_argument("--events", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--prefork", type=int, default=8, help="Celery prefork processes")
    p.add_argument("--work", choices=["plain", "mesh", "both"], default="both")
    p.add_argument(
        "--only", help="comma-separated senders: raw,egress,faststream,celery-threads,..."
    )
    p.add_argument("--faststream", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--enqueue", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.faststream:
        nats_url, url, c, work = args.faststream
        run_faststream(nats_url, url, int(c), work == "1")
        return
    if args.enqueue:
        enqueue(int(args.enqueue[0]), args.enqueue[1] == "1")
        return
    if args.events is None:
        args.events = 1000 if args.quick else 5000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    started = time.monotonic()
    asyncio.run(run(args))
    print(f"({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    cli()
