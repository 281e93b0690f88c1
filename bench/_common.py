"""Shared pieces of the benchmarks: a scratch mesh, a receiver process, the egress as a
process, percentiles and the one output format every bench prints.

The receiver runs in its own process (``python -m bench._common receiver PORT``) so that
its work does not count against whatever is being measured in the bench process; it
records the arrival time of every request by ``webhook-id`` and counts per path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from mesh.broker import EmbeddedBroker, free_port  # noqa: E402
from mesh.client import MeshClient  # noqa: E402
from mesh.config import Settings  # noqa: E402
from mesh.durability import SyncMode  # noqa: E402
from mesh.observability import configure_logging  # noqa: E402

PAD = "x" * 200  # filler in every benchmark event: ~250 B of data


# Output -----------------------------------------------------------------------------


@dataclass
class Result:
    """One figure, its raw baseline from the same run, and their ratio."""

    bench: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    aim: str = ""
    higher_is_better: bool = True
    note: str = ""
    reported_ratio: float | None = None  # as a script printed it (e.g. a median of pairs)

    @property
    def ratio(self) -> float | None:
        if self.reported_ratio is not None:
            return self.reported_ratio
        if self.baseline is None or not self.baseline or not self.value:
            return None
        return self.value / self.baseline


RESULTS: list[Result] = []


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def report(result: Result) -> Result:
    """Print one figure line (and keep it for the summary)."""
    RESULTS.append(result)
    line = f"  {result.name:<38} {fmt(result.value):>10} {result.unit:<12}"
    if result.baseline is not None:
        line += f" raw {result.baseline_name + ' ' if result.baseline_name else ''}"
        line += f"{fmt(result.baseline)} {result.unit}"
        if result.ratio is not None:
            line += f"  ratio {result.ratio:.2f}"
    if result.aim:
        line += f"  (aim {result.aim})"
    if result.note:
        line += f"  [{result.note}]"
    print(line, flush=True)
    return result


def header(title: str) -> None:
    print(f"\n== {title}", flush=True)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary() -> None:
    if not RESULTS:
        return
    print("\n== summary")
    print(f"  {'bench':<9} {'figure':<38} {'value':>12} {'raw':>12} {'ratio':>6}  aim")
    for r in RESULTS:
        raw = fmt(r.baseline) if r.baseline is not None else ""
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        print(
            f"  {r.bench:<9} {r.name:<38} {fmt(r.value) + ' ' + r.unit:>12}"
            f" {raw:>12} {ratio:>6}  {r.aim}"
        )


# A scratch mesh ---------------------------------------------------------------------


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `mesh` subprocess pointed at the same scratch mesh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_HOME": str(settings.home),
            "MESH_NATS_URL": settings.nats_url or "",
            "MESH_DB_URL": settings.db_url,
            "MESH_ALLOW_PRIVATE_TARGETS": "1",
            "MESH_HTTP_PORT": str(settings.http_port),
            "MESH_BRIDGE_PORT": str(settings.bridge_port),
            "MESH_API_PORT": str(settings.api_port),
            "MESH_CONFIG": str(settings.home / "no-mesh.toml"),
            "MESH_LOG_FORMAT": "json",
            "MESH_LOG_LEVEL": "warning",
            "MESH_ENCRYPTION": "1" if settings.encryption else "0",
        }
    )
    env.update(extra)
    return env


@dataclass
class Scratch:
    """A nats-server on a free port in a temporary directory, and settings for it."""

    tmp: Path
    broker: EmbeddedBroker
    settings: Settings
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    profiles: list[Path] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return env_for(self.settings, **extra)

    def client(self, name: str = "bench") -> MeshClient:
        return MeshClient(self.settings, name=name)


@contextlib.asynccontextmanager
async def scratch_mesh(
    encryption: bool = True, sync: SyncMode = SyncMode.ALWAYS
) -> AsyncIterator[Scratch]:
    configure_logging("console", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    broker = EmbeddedBroker(tmp / "nats", port=free_port(), log_file=tmp / "nats.log", sync=sync)
    await broker.astart()
    settings = Settings(
        home=tmp / "home",
        nats_url=broker.url,
        allow_private_targets=True,
        http_port=free_port(),
        bridge_port=free_port(),
        api_port=free_port(),
        encryption=encryption,
        log_level="warning",
    )
    mesh = Scratch(tmp, broker, settings)
    keep = bool(os.environ.get("MESH_BENCH_KEEP"))
    try:
        async with mesh.client("bench-init") as c:
            await c.init()
        yield mesh
    except BaseException:
        keep = True  # the logs (egress.log, nats.log) say what went wrong
        raise
    finally:
        for proc in mesh.procs:
            stop_process(proc)
        await broker.astop()
        for path in mesh.profiles:
            if path.exists():
                print(f"\n-- profile of the egress ({path.name})\n{path.read_text()}", flush=True)
        if keep:
            print(f"  (scratch directory kept: {tmp})", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# Processes --------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_egress(mesh: Scratch, profile: bool = False, **extra_env: str) -> subprocess.Popen[bytes]:
    """``mesh serve webhook-egress`` as its own process (stderr in the scratch dir).

    With ``profile`` it runs under pyinstrument (``pip install pyinstrument``), whose
    report is written to ``egress-profile.txt`` in the scratch directory when it stops.
    """
    log = open(mesh.tmp / "egress.log", "ab")  # noqa: SIM115 (owned by the child)
    cmd = [sys.executable, "-m", "mesh.cli", "serve", "webhook-egress"]
    if profile:
        out = mesh.tmp / "egress-profile.txt"
        cmd = [sys.executable, "-m", "pyinstrument", "--no-color", "-o", str(out), *cmd[1:]]
        mesh.profiles.append(out)
    proc = subprocess.Popen(
        cmd, env=mesh.env(**extra_env), stdout=subprocess.DEVNULL, stderr=log, cwd=str(ROOT)
    )
    log.close()
    mesh.procs.append(proc)
    return proc


def start_receiver(mesh: Scratch, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._common", "receiver", str(port)],
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=open(mesh.tmp / f"receiver-{port}.log", "ab"),  # noqa: SIM115
    )
    mesh.procs.append(proc)
    return proc, port


# Receiver ---------------------------------------------------------------------------


def run_receiver(port: int) -> None:
    """An aiohttp webhook receiver: 200 to every POST /hook/<name>; /stats, /arrivals."""
    from aiohttp import web

    arrivals: dict[str, float] = {}
    counts: dict[str, int] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        now = time.time()
        name = request.match_info.get("name", "")
        arrivals[request.headers.get("webhook-id", "")] = now
        counts[name] = counts.get(name, 0) + 1
        first.setdefault(name, now)
        last[name] = now
        return web.Response(status=200)

    async def stats(_: web.Request) -> web.Response:
        total = sum(counts.values())
        return web.json_response(
            {
                "count": total,
                "counts": counts,
                "first": min(first.values()) if first else None,
                "last": max(last.values()) if last else None,
                "unique": len(arrivals),
            }
        )

    async def get_arrivals(_: web.Request) -> web.Response:
        return web.Response(body=json.dumps(arrivals).encode(), content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        arrivals.clear()
        counts.clear()
        first.clear()
        last.clear()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook/{name}", hook)
    app.router.add_get("/stats", stats)
    app.router.add_get("/arrivals", get_arrivals)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class Receiver:
    """Talks to a receiver process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self._session: aiohttp.ClientSession | None = None

    def url(self, name: str = "bench") -> str:
        return f"{self.base}/hook/{name}"

    async def _call(self, method: str, path: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.request(method, self.base + path) as r:
            return await r.json(loads=json.loads)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.stats()
                return
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > deadline:
                    raise SystemExit(f"receiver on port {self.port} did not start") from None
                await asyncio.sleep(0.05)

    async def reset(self) -> None:
        await self._call("POST", "/reset")

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/stats")
        return result

    async def arrivals(self) -> dict[str, float]:
        result: dict[str, float] = await self._call("GET", "/arrivals")
        return result

    async def wait_count(
        self, n: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
    ) -> dict[str, Any]:
        """Poll until the receiver has ``n`` requests (SystemExit on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            st = await self.stats()
            if st["count"] >= n:
                return st
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"the egress exited ({proc.returncode}) with {st['count']}/{n}")
            if time.monotonic() > deadline:
                raise SystemExit(f"receiver got {st['count']} of {n} within {timeout:.0f}s")
            await asyncio.sleep(0.1)


async def raw_posts(url: str, n: int, concurrency: int, body_size: int = 300) -> float:
    """The raw limit of HTTP delivery here: n signed POSTs by one aiohttp session at
    ``concurrency``, requests/s measured at the client."""
    from mesh.signing import signature_headers

    secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
    body = json.dumps(
        {"type": "order.created", "timestamp": "2025-01-01T00:00:00Z", "data": {"pad": PAD}}
    ).encode()[:body_size]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                headers = signature_headers(f"raw-{i}", body, secret)
                headers["content-type"] = "application/json"
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def rate_between(count: int, first: float | None, last: float | None) -> float:
    if count < 2 or first is None or last is None or last <= first:
        return float("nan")
    return (count - 1) / (last - first)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "receiver":
        with contextlib.suppress(KeyboardInterrupt):
            run_receiver(int(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m bench._common receiver PORT")
