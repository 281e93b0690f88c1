"""Bridge fan-out: deliveries/s to N WebSocket clients, against raw core-NATS fan-out.

One broadcast source, one stream target, N WebSocket clients tailing it (tail
mode: each client gets every event). The publisher sends M events through
JetStream (pipelined); the clock runs from the first publish to the last frame
received by the last client. The baseline, in the same run, is the same number
of messages of the same size published on a core-NATS subject to N
subscribers, each on its own connection (what the bridge's clients would get
if they spoke NATS directly, with no persistence, no decryption, no JSON, no
WebSocket).

    .venv/bin/python bench/bridge.py                      # N = 1, 10, 100
    .venv/bin/python bench/bridge.py --clients 1,10 --deliveries 20000 --payload 256
    .venv/bin/python bench/bridge.py --in-process         # bridge in this process

By default the bridge runs as its own process (`mesh serve bridge`), as it does
in production, so that the clients' work in this process does not count against
it; nats-server is its own process too. It starts its own nats-server on a free
port, in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import nats

from mesh import tokens
from mesh.broker import EmbeddedBroker, free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.observability import configure_logging
from mesh.registry import Target, TargetKind
from services.bridge import Bridge, BridgeOptions


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_HOME": str(settings.home),
            "MESH_NATS_URL": settings.nats_url or "",
            "MESH_BRIDGE_PORT": str(settings.bridge_port),
            "MESH_HTTP_PORT": str(settings.http_port),
            "MESH_ENCRYPTION": "1" if settings.encryption else "0",
            "MESH_CONFIG": str(settings.home / "no-mesh.toml"),
            "MESH_LOG_LEVEL": "warning",
            "MESH_LOG_FORMAT": "json",
        }
    )
    return env


async def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bridge process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit("bridge did not start listening")
        await asyncio.sleep(0.1)


async def connect_all(
    http: aiohttp.ClientSession, url: str, token: str, n: int, params: dict[str, str]
) -> list[aiohttp.ClientWebSocketResponse]:
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    for start in range(0, n, 25):
        sockets += await asyncio.gather(
            *(
                http.ws_connect(
                    url,
                    params={"target": "screens", **params},
                    headers={"Authorization": f"Bearer {token}"},
                    max_msg_size=0,
                )
                for _ in range(min(25, n - start))
            )
        )
    return sockets


async def read_all(sockets: list[aiohttp.ClientWebSocketResponse], m: int) -> None:
    async def reader(ws: aiohttp.ClientWebSocketResponse) -> None:
        got = 0
        while got < m:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise SystemExit(f"client closed early: {msg.type} {msg.data} after {got}")
            got += 1
        last = json.loads(msg.data)
        assert last["data"]["n"] == m - 1, last

    await asyncio.gather(*(reader(ws) for ws in sockets))
    await asyncio.gather(*(ws.close() for ws in sockets))


async def publish(client: MeshClient, m: int, payload: str) -> None:
    events = [client.build("news", "tick", {"n": i, "blob": payload}) for i in range(m)]
    for i in range(0, m, 1000):
        await client.publish_many(events[i : i + 1000], window=500)


async def live_run(
    client: MeshClient,
    http: aiohttp.ClientSession,
    url: str,
    token: str,
    n: int,
    m: int,
    payload: str,
) -> float:
    """N clients tailing live; the clock runs from the first publish to the last frame."""
    sockets = await connect_all(http, url, token, n, {"mode": "tail"})
    readers = asyncio.create_task(read_all(sockets, m))
    t0 = time.perf_counter()
    await publish(client, m, payload)
    await asyncio.wait_for(asyncio.shield(readers), 600)
    return n * m / (time.perf_counter() - t0)


async def stored_run(
    client: MeshClient,
    http: aiohttp.ClientSession,
    url: str,
    token: str,
    n: int,
    m: int,
    payload: str,
) -> float:
    """M events already stored; N clients tail them from their sequence. The clock runs from
    the first connect (admission and consumer creation included) to the last frame."""
    info = await client.js.stream_info(client.names.events)
    start = info.state.last_seq + 1
    await publish(client, m, payload)
    t0 = time.perf_counter()
    sockets = await connect_all(http, url, token, n, {"mode": "tail", "since_seq": str(start)})
    await asyncio.wait_for(read_all(sockets, m), 600)
    return n * m / (time.perf_counter() - t0)


async def publish_rate(client: MeshClient, m: int, payload: str) -> float:
    t0 = time.perf_counter()
    await publish(client, m, payload)
    return m / (time.perf_counter() - t0)


async def raw_run(url: str, n: int, m: int, body: bytes) -> float:
    """N core-NATS subscribers on their own connections, M messages: deliveries/s."""
    subject = f"bench.raw.{secrets.token_hex(3)}"
    done = asyncio.Event()
    remaining = [n * m]
    conns = [await nats.connect(url) for _ in range(n)]

    async def on_msg(_: object) -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            done.set()

    for nc in conns:
        await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=m + 10)
        await nc.flush()
    pub = await nats.connect(url)
    t0 = time.perf_counter()
    for i in range(m):
        await pub.publish(subject, body)
        if i % 1000 == 999:
            await pub.flush()
    await pub.flush()
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - t0
    await pub.close()
    for nc in conns:
        await nc.close()
    return n * m / elapsed


async def main(args: argparse.Namespace) -> None:
    configure_logging("console", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-bridge-"))
    broker = EmbeddedBroker(tmp / "nats", port=free_port(), log_file=tmp / "nats.log")
    await broker.astart()
    settings = Settings(
        home=tmp / "home",
        nats_url=broker.url,
        bridge_port=free_port(),
        http_port=free_port(),
        encryption=not args.no_encryption,
    )
    proc: subprocess.Popen[bytes] | None = None
    bridge: Bridge | None = None
    payload = "x" * args.payload
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    try:
        async with MeshClient(settings, name="bench") as client:
            await client.init()
            await client.add_target(Target(name="screens", kind=TargetKind.STREAM))
            await client.add_propagation("broadcast", "news")
            key = tokens.load_key(tokens.key_path(settings))
            token = tokens.issue(key, "screens", ttl=timedelta(hours=2))
            if args.in_process:
                bridge = Bridge(settings, options=BridgeOptions(host="127.0.0.1"))
                await bridge.start()
            else:
                proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before timing)
                    [sys.executable, "-m", "mesh.cli", "serve", "bridge"],
                    env=env_for(settings),
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp / "bridge.log", "wb"),  # noqa: SIM115, ASYNC230
                )
            await wait_port(settings.bridge_port, proc)
            url = f"ws://127.0.0.1:{settings.bridge_port}/v1/stream"
            body = json.dumps({"n": 0, "blob": payload}).encode()
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                pub = await publish_rate(client, args.deliveries // 4, payload)
                print(f"JetStream publish alone: {pub:,.0f} events/s", flush=True)
                for n in clients:
                    m = max(args.min_events, args.deliveries // n)
                    live = await live_run(client, http, url, token, n, m, payload)
                    stored = await stored_run(client, http, url, token, n, m, payload)
                    raw = await raw_run(broker.url, n, m, body)
                    rows.append((n, m, live, stored, raw))
                    print(
                        f"N={n:>4} events={m:>6}: bridge live {live:>9,.0f}/s,"
                        f" from stream {stored:>9,.0f}/s; core-NATS {raw:>9,.0f}/s",
                        flush=True,
                    )
    finally:
        if bridge is not None:
            await bridge.stop()
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()
        await broker.astop()
    where = "in-process" if args.in_process else "own process"
    enc = "off" if args.no_encryption else "on"
    print(
        f"\nbridge {where}, encryption {enc}, payload {args.payload} B, tail mode;"
        f" {os.cpu_count()} CPUs shared with whatever else runs here"
    )
    print(
        f"{'N':>5} {'events':>7} {'live/s':>10} {'stored/s':>10} {'core-NATS/s':>12}"
        f" {'live:raw':>9} {'stored:raw':>10}"
    )
    for n, m, live, stored, raw in rows:
        print(
            f"{n:>5} {m:>7} {live:>10,.0f} {stored:>10,.0f} {raw:>12,.0f}"
            f" {live / raw:>9.3f} {stored / raw:>10.3f}"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default="1,10,100", help="comma-separated N values")
    p.add_argument(
        "--deliveries", type=int, default=20000, help="target deliveries per N (events = this / N)"
    )
    p.add_argument("--min-events", type=int, default=200, help="at least this many events per N")
    p.add_argument("--payload", type=int, default=64, help="bytes of filler in each event")
    p.add_argument("--no-encryption", action="store_true", help="publish plaintext bodies")
    p.add_argument("--in-process", action="store_true", help="run the bridge in this process")
    asyncio.run(main(p.parse_args()))
