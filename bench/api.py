"""Publishing over the HTTP API against the Python client, in the same run.

    python -m bench api [--quick] [--events N] [--concurrency C] [--batch B] [--rounds R]

The API runs as its own process (``mesh serve api``, as in production); the requests
come from this process over keep-alive connections, with a real API key. Pairs,
alternated within each round (medians over the rounds are reported):

1. single: ``POST /v1/events`` from C concurrent workers, against ``MeshClient.publish``
   awaited from C concurrent workers;
2. batch: ``POST /v1/events:batch`` of B events from C concurrent workers, against
   ``MeshClient.publish_many`` of B events from C concurrent workers;
3. latency: one ``POST /v1/events`` every 5 ms (200 req/s, open loop: a slow answer does
   not delay the next request) for a few seconds: p50 and p99, against
   ``MeshClient.publish`` at the same rate.

Both sides publish the same ~250 B data, encrypted, into the same stream. The ratio is
the share of the client path's rate the API keeps while parsing, authenticating,
validating and answering over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
import psutil

from bench._common import PAD, Result, Scratch, header, pct, report, scratch_mesh, stop_process
from mesh.apikeys import ApiKeyStore, Scope
from mesh.broker import free_port
from mesh.client import MeshClient

RATE = 200  # requests per second for the latency pair


def _data(i: int) -> dict[str, Any]:
    return {"i": i, "pad": PAD}


def _event(i: int) -> dict[str, Any]:
    return {"source": "shop", "type": "order.created", "data": _data(i)}


def spawn_api(mesh: Scratch) -> tuple[subprocess.Popen[bytes], str]:
    """``mesh serve api`` on a free port, without a per-key rate limit to hit."""
    port = free_port()
    env = mesh.env(MESH_API_PORT=str(port), MESH_API_RATE="1000000000")
    with open(mesh.tmp / "api.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "serve", "api"], env=env, stdout=log, stderr=log
        )
    mesh.procs.append(proc)
    return proc, f"http://127.0.0.1:{port}"


async def start_api(mesh: Scratch) -> tuple[subprocess.Popen[bytes], str]:
    proc, url = spawn_api(mesh)
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url + "/v1/openapi.json") as resp:
                    if resp.status == 200:
                        return proc, url
            except aiohttp.ClientError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the API did not start (see {mesh.tmp / 'api.log'})")
            await asyncio.sleep(0.2)


async def _workers(n: int, concurrency: int, one: Any) -> float:
    """Run ``one(i)`` for i in range(n) from ``concurrency`` workers; items per second."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started)


async def single_api(s: aiohttp.ClientSession, url: str, n: int, conc: int) -> float:
    async def one(i: int) -> None:
        async with s.post(url + "/v1/events", json=_event(i)) as resp:
            if resp.status != 202:
                raise SystemExit(f"POST /v1/events answered {resp.status}: {await resp.text()}")
            await resp.read()

    return await _workers(n, conc, one)


async def single_client(c: MeshClient, n: int, conc: int) -> float:
    async def one(i: int) -> None:
        await c.publish("shop", "order.created", _data(i))

    return await _workers(n, conc, one)


async def batch_api(s: aiohttp.ClientSession, url: str, n: int, conc: int, size: int) -> float:
    async def one(b: int) -> None:
        body = {"events": [_event(b * size + k) for k in range(size)]}
        async with s.post(url + "/v1/events:batch", json=body) as resp:
            if resp.status != 202:
                raise SystemExit(f"POST :batch answered {resp.status}: {await resp.text()}")
            await resp.read()

    return await _workers(n // size, conc, one) * size


async def batch_client(c: MeshClient, n: int, conc: int, size: int) -> float:
    async def one(b: int) -> None:
        events = [c.build("shop", "order.created", _data(b * size + k)) for k in range(size)]
        await c.publish_many(events)

    return await _workers(n // size, conc, one) * size


async def paced(seconds: float, one: Any) -> list[float]:
    """Start ``one(i)`` every 1/RATE s (open loop) for ``seconds``; latencies in ms."""
    latencies: list[float] = []

    async def timed(i: int) -> None:
        t0 = time.perf_counter()
        await one(i)
        latencies.append((time.perf_counter() - t0) * 1000)

    tasks = []
    start = time.perf_counter()
    for i in range(int(seconds * RATE)):
        delay = start + i / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(i)))
    await asyncio.gather(*tasks)
    return latencies


async def run(args: argparse.Namespace) -> list[Result]:
    n = args.events or (4_000 if args.quick else 20_000)
    conc = args.concurrency
    size = args.batch
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = 5.0 if args.quick else 15.0
    header(
        f"api: {n:,} events of ~250 B data, encrypted; {conc} concurrent requests;"
        f" batches of {size}; {rounds} rounds, medians; latency at {RATE}/s for {seconds:g}s"
    )
    rates: dict[str, list[float]] = {k: [] for k in ("sa", "sc", "ba", "bc")}
    cpu_us: list[float] = []  # the API process's CPU per single POST
    async with scratch_mesh() as mesh, mesh.client() as c:
        store = await ApiKeyStore.open(c.port, c.names.apikeys)
        _, key = await store.create("bench", Scope.PUBLISH)
        proc, url = await start_api(mesh)
        headers = {"Authorization": f"Bearer {key}"}
        conn = aiohttp.TCPConnector(limit=conc * 2)
        async with aiohttp.ClientSession(headers=headers, connector=conn) as s:
            await single_api(s, url, 200, conc)  # warm up both paths
            await single_client(c, 200, conc)
            api_proc = psutil.Process(proc.pid)
            for _ in range(rounds):
                rates["sc"].append(await single_client(c, n, conc))
                before = sum(api_proc.cpu_times()[:2])
                rates["sa"].append(await single_api(s, url, n, conc))
                cpu_us.append((sum(api_proc.cpu_times()[:2]) - before) / n * 1e6)
                rates["bc"].append(await batch_client(c, n, conc, size))
                rates["ba"].append(await batch_api(s, url, n, conc, size))

            async def post(i: int) -> None:
                async with s.post(url + "/v1/events", json=_event(i)) as resp:
                    await resp.read()

            async def pub(i: int) -> None:
                await c.publish("shop", "order.created", _data(i))

            lat_api = await paced(seconds, post)
            lat_client = await paced(seconds, pub)
        stop_process(proc)
    med = {k: statistics.median(v) for k, v in rates.items()}
    p99_api, p99_client = pct(lat_api, 99), pct(lat_client, 99)
    return [
        report(
            Result(
                "api", "POST /v1/events", med["sa"], "events/s",
                med["sc"], "MeshClient.publish", ">= 0.5",
                note=f"API process CPU {statistics.median(cpu_us):.0f} us per request",
            )
        ),
        report(
            Result(
                "api", f"POST /v1/events:batch ({size}/request)", med["ba"], "events/s",
                med["bc"], "publish_many", ">= 0.8",
            )
        ),
        report(
            Result(
                "api", f"p99 POST /v1/events at {RATE}/s", p99_api, "ms",
                p99_client, "MeshClient.publish p99", "< 20 ms", higher_is_better=False,
                note=f"p50 {pct(lat_api, 50):.1f} ms (client p50 {pct(lat_client, 50):.1f} ms)",
            )
        ),
    ]  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=None, help="events per throughput run")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--batch", type=int, default=100, help="events per batch request")
    p.add_argument("--rounds", type=int, default=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_args(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
