"""Webhook egress throughput and latency, against raw aiohttp POSTs, in the same run.

    python bench/egress.py [--quick] [--events N] [--concurrency C] [--rate R] [--rounds K]
                           [--instances I] [--profile] [--sync always|lazy|both]
                           [--tracing [--baseline DIR]]

1. A receiver (aiohttp, its own process) records each request's arrival time.
2. Egress: N events are published to a fresh broker, then ``mesh serve webhook-egress``
   (its own process) delivers the backlog to the receiver with ``max_in_flight = C``.
   Deliveries/s = N / (last arrival - first arrival).
3. Raw: the same N bodies POSTed by one aiohttp session at concurrency C, measured the
   same way at the same receiver.
4. Latency: with the egress running, events are published at a steady R/s; publish-to-
   receipt latency p50/p99 from the publisher's clock and the receiver's (same machine).

``--profile`` runs the egress in this process under cProfile for the throughput step and
prints the top functions instead of starting a subprocess.

``--tracing`` (issue #21) measures, in the same run (rounds rotate the order; medians),
the egress with OpenTelemetry not importable ("no otel"), with tracing off, on with every
trace sampled, and on with 1 % sampled (``parentbased_traceidratio``; every event carries
a ``traceparent``, sampled in that share, as a traced publisher would send them),
exporting OTLP/HTTP to the receiver process; it prints off against no otel, and on
against off, then times the egress's tracing step per attempt alone (off, on unsampled).
``--baseline DIR`` adds the egress of another checkout (``PYTHONPATH=DIR``, e.g. main
before tracing) as one more reference for "off".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.broker import EmbeddedBroker, free_port  # noqa: E402
from mesh.client import MeshClient  # noqa: E402
from mesh.config import Settings  # noqa: E402
from mesh.durability import SyncMode  # noqa: E402
from mesh.registry import Target, TargetKind  # noqa: E402
from mesh.signing import signature_headers  # noqa: E402

# Receiver process ---------------------------------------------------------------


def run_receiver(port: int) -> None:
    arrivals: dict[str, float] = {}
    count = [0]

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        arrivals[request.headers.get("webhook-id", str(count[0]))] = time.time()
        count[0] += 1
        return web.Response(status=200)

    async def reset(_: web.Request) -> web.Response:
        arrivals.clear()
        count[0] = 0
        return web.json_response({"ok": True})

    spans = [0]

    async def otlp(request: web.Request) -> web.Response:
        spans[0] += len(await request.read())  # an OTLP/HTTP sink: bytes, not decoded
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"count": count[0], "arrivals": arrivals, "otlp": spans[0]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", otlp)
    app.router.add_post("/v1/metrics", otlp)
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, shutdown_timeout=1)


class ReceiverClient:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def call(self, method: str, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.request(method, self.base + path) as r:
            return await r.json()

    async def reset(self) -> None:
        await self.call("POST", "/reset")

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", "/stats")
        return result

    async def wait_count(self, n: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.stats()
            if st["count"] >= n:
                return st
            if time.monotonic() > deadline:
                raise SystemExit(f"receiver got {st['count']} of {n} within {timeout:.0f}s")
            await asyncio.sleep(0.1)


def rate_of(arrivals: dict[str, float]) -> float:
    times = sorted(arrivals.values())
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


# Steps --------------------------------------------------------------------------

CPU: dict[str, list[float]] = {}  # CPU microseconds per delivery, by sender, per round
BROKER_PROC: list[Any] = []  # psutil.Process of the nats-server
RECEIVER_PROC: list[Any] = []  # psutil.Process of the receiver


def _cpu_s(procs: list[Any]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


async def start_egress_process(env: dict[str, str]) -> asyncio.subprocess.Process:
    mesh = os.path.join(os.path.dirname(sys.executable), "mesh")
    return await asyncio.create_subprocess_exec(
        mesh,
        "serve",
        "webhook-egress",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def egress_throughput(
    client: MeshClient,
    rx: ReceiverClient,
    env: dict[str, str],
    settings: Settings,
    n: int,
    profile: bool,
    instances: int,
    sampled: float | None = None,
) -> float:
    await rx.reset()
    events = [client.build("shop", "order.created", {"i": i, "pad": "x" * 200}) for i in range(n)]
    if sampled is not None:
        for i, event in enumerate(events):
            flags = "01" if int((i + 1) * sampled) > int(i * sampled) else "00"
            trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
            event.extensions["traceparent"] = f"00-{trace_id}-{span_id}-{flags}"
    await client.publish_many(events)
    if profile:
        import cProfile
        import pstats

        from services.egress.service import WebhookEgress

        svc = WebhookEgress(settings)
        prof = cProfile.Profile(time.process_time)  # CPU time: waits for a core do not count
        prof.enable()
        await svc.start()
        st = await rx.wait_count(n, timeout=300)
        prof.disable()
        await svc.stop()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return rate_of(st["arrivals"])
    import psutil

    procs = [await start_egress_process(env) for _ in range(instances)]
    try:
        await rx.wait_count(1, timeout=60)
        ps = [psutil.Process(p.pid) for p in procs]
        cpu0 = _cpu_s(ps)
        broker_cpu0 = _cpu_s(BROKER_PROC)
        rx_cpu0 = _cpu_s(RECEIVER_PROC)
        first = (await rx.stats())["count"]
        st = await rx.wait_count(n, timeout=300)
        cpu1 = _cpu_s(ps)
        done = max(1, st["count"] - first)
        CPU.setdefault("egress", []).append((cpu1 - cpu0) / done * 1e6)
        CPU.setdefault("receiver-egress", []).append((_cpu_s(RECEIVER_PROC) - rx_cpu0) / done * 1e6)
        if BROKER_PROC:
            broker_cpu = _cpu_s(BROKER_PROC) - broker_cpu0
            CPU.setdefault("broker", []).append(broker_cpu / done * 1e6)
    finally:
        await asyncio.gather(*(stop_process(p) for p in procs))
    return rate_of(st["arrivals"])


async def raw_throughput(rx: ReceiverClient, url: str, n: int, concurrency: int) -> float:
    await rx.reset()
    secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
    bodies = []
    for i in range(n):
        body = json.dumps(
            {
                "type": "order.created",
                "timestamp": "2025-01-01T00:00:00Z",
                "data": {"i": i, "pad": "x" * 200},
            },
            separators=(",", ":"),
        ).encode()
        headers = signature_headers(f"raw-{i}", body, secret)
        headers["content-type"] = "application/json"
        bodies.append((body, headers))
    queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while True:
                try:
                    body, headers = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()

        cpu0 = time.process_time()
        rx_cpu0 = _cpu_s(RECEIVER_PROC)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        CPU.setdefault("raw", []).append((time.process_time() - cpu0) / n * 1e6)
        CPU.setdefault("receiver-raw", []).append((_cpu_s(RECEIVER_PROC) - rx_cpu0) / n * 1e6)
    st = await rx.wait_count(n, timeout=60)
    return rate_of(st["arrivals"])


async def latency(
    client: MeshClient, rx: ReceiverClient, env: dict[str, str], rate: float, seconds: float
) -> list[float]:
    await rx.reset()
    proc = await start_egress_process(env)
    try:
        # Warm up: the egress is running and delivering before we measure.
        await client.publish("shop", "warm.up", {})
        await rx.wait_count(1, timeout=30)
        await rx.reset()
        sent: dict[str, float] = {}
        total = int(rate * seconds)
        start = time.monotonic()
        for i in range(total):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            event = client.build("shop", "order.created", {"i": i, "pad": "x" * 200})
            sent[event.id] = time.time()
            await client.publish_event(event)
        st = await rx.wait_count(total, timeout=60)
    finally:
        await stop_process(proc)
    arrivals: dict[str, float] = st["arrivals"]
    return [(arrivals[i] - t) * 1000 for i, t in sent.items() if i in arrivals]


def print_budget(raw: float, eg: float) -> None:
    """What the machine's CPUs allow each side, from the CPU each process spent.

    Every process of a run shares the same cores, so a side's rate is bounded by
    cores / (CPU microseconds per delivery summed over its processes); when both runs
    keep the cores busy, the ratio of the two bounds is the ratio to expect.
    """
    cores = os.cpu_count() or 1

    def med(key: str) -> float:
        return statistics.median(CPU.get(key, [0.0]))

    raw_us = med("raw") + med("receiver-raw")
    eg_us = med("egress") + med("broker") + med("receiver-egress")
    if not raw_us or not eg_us:
        return
    raw_cap, eg_cap = cores * 1e6 / raw_us, cores * 1e6 / eg_us
    print(
        f"CPU per delivery, all processes: raw {raw_us:.0f} us (client {med('raw'):.0f}"
        f" + receiver {med('receiver-raw'):.0f}); egress {eg_us:.0f} us (egress"
        f" {med('egress'):.0f} + nats-server {med('broker'):.0f} + receiver"
        f" {med('receiver-egress'):.0f})"
    )
    print(
        f"CPU bound on {cores} cores: raw {raw_cap:.0f}/s (used {raw / raw_cap:.0%}),"
        f" egress {eg_cap:.0f}/s (used {eg / eg_cap:.0%}); ratio of the bounds"
        f" {eg_cap / raw_cap:.2f}"
    )


async def one_mode(args: argparse.Namespace, sync: SyncMode, tag: str = "") -> float:
    """The whole run on a broker in ``sync`` mode; the egress's median deliveries/s."""

    def out(line: str) -> None:
        print(f"[{tag}] {line}" if tag else line, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    broker = EmbeddedBroker(tmp / "nats", port=free_port(), log_file=tmp / "nats.log", sync=sync)
    await broker.astart()
    if broker.proc is not None:
        import psutil

        BROKER_PROC.clear()
        BROKER_PROC.append(psutil.Process(broker.proc.pid))
    rx_port = free_port()
    rx_proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--receiver", str(rx_port)
    )
    import psutil

    RECEIVER_PROC.clear()
    RECEIVER_PROC.append(psutil.Process(rx_proc.pid))
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
    rx = ReceiverClient(rx_port)
    url = f"http://127.0.0.1:{rx_port}/hook"
    try:
        for _ in range(600):  # a loaded machine starts the receiver slowly
            try:
                await rx.stats()
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        else:
            raise SystemExit("the receiver process did not start within 30 s")
        async with MeshClient(settings, name="bench") as client:
            await client.init()
            target = Target(
                name="bench", kind=TargetKind.WEBHOOK, url=url, max_in_flight=args.concurrency
            )
            await client.add_target(target)
            await client.add_propagation("unidirectional", "shop", ["bench"])
            n = args.events
            c = args.concurrency
            out(
                f"events={n} concurrency={c} rounds={args.rounds} egress instances="
                f"{args.instances} (receiver in its own process) broker sync={sync}"
            )
            if args.tracing:
                await tracing_rounds(client, rx, env, settings, url, rx_port, args)
                return
            raws: list[float] = []
            egs: list[float] = []
            for r in range(args.rounds):
                # Alternate the order so drift in machine load does not favour one side.
                steps = ["raw", "egress"] if r % 2 == 0 else ["egress", "raw"]
                for step in steps:
                    if step == "raw":
                        raws.append(await raw_throughput(rx, url, n, c))
                    else:
                        egs.append(
                            await egress_throughput(
                                client,
                                rx,
                                env,
                                settings,
                                n,
                                args.profile,
                                args.instances,
                                args.sampled,
                            )
                        )
                out(f"  round {r + 1}: raw {raws[-1]:7.0f}/s  egress {egs[-1]:7.0f}/s")
            raw, eg = statistics.median(raws), statistics.median(egs)
            out(f"raw aiohttp POSTs : {raw:8.0f} deliveries/s (median)")
            out(f"webhook egress    : {eg:8.0f} deliveries/s (median)")
            out(f"ratio             : {eg / raw:8.2f}   (aim >= 0.8)")
            if CPU:
                out(
                    f"sender CPU per delivery: raw {statistics.median(CPU.get('raw', [0])):.0f} us,"
                    f" egress {statistics.median(CPU.get('egress', [0])):.0f} us"
                    " (all egress processes), nats-server during the egress run"
                    f" {statistics.median(CPU.get('broker', [0])):.0f} us"
                )
                print_budget(raw, eg)
            if not args.profile:
                lat = await latency(client, rx, env, args.rate, args.seconds)
                out(
                    f"latency at {args.rate:.0f}/s for {args.seconds:.0f}s ({len(lat)} events):"
                    f" p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms,"
                    f" mean {statistics.fmean(lat):.1f} ms"
                )
    finally:
        await stop_process(rx_proc)
        await broker.astop()
    CPU.clear()
    return eg


async def main(args: argparse.Namespace) -> None:
    if args.sync != "both":
        await one_mode(args, SyncMode(args.sync))
        return
    # The product's default first, in the lines bench/__main__.py reads; then the opt-out.
    always = await one_mode(args, SyncMode.ALWAYS)
    lazy = await one_mode(args, SyncMode.LAZY, tag="lazy")
    print(
        f"sync cost: egress with sync always {always:.0f}/s, lazy {lazy:.0f}/s:"
        f" ratio {always / lazy:.2f}"
    )


async def tracing_rounds(
    client: MeshClient,
    rx: ReceiverClient,
    env: dict[str, str],
    settings: Settings,
    url: str,
    rx_port: int,
    args: argparse.Namespace,
) -> None:
    """Egress deliveries/s with tracing off, on (100 %), on (1 %), same run."""
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rx_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "mesh-bench",
    }
    # "no otel": OpenTelemetry not importable at all (a regular package named
    # opentelemetry earlier on the path shadows the installed namespace package and
    # raises ImportError), as on an install without the otel extra.
    blocker = Path(tempfile.mkdtemp(prefix="mesh-nootel-"))
    (blocker / "opentelemetry").mkdir()
    (blocker / "opentelemetry" / "__init__.py").write_text(
        'raise ImportError("opentelemetry hidden by bench/egress.py (no otel mode)")\n'
    )
    path = os.pathsep.join(p for p in (str(blocker), env.get("PYTHONPATH", "")) if p)
    modes: dict[str, tuple[dict[str, str], float]] = {
        "no otel": ({**env, "PYTHONPATH": path}, 0.01),
        "off": (env, 0.01),
        "on 100%": ({**env, **otel, "OTEL_TRACES_SAMPLER": "parentbased_always_on"}, 1.0),
        "on 1%": (
            {
                **env,
                **otel,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.01",
            },
            0.01,
        ),
    }
    if args.baseline:
        modes["before"] = ({**env, "PYTHONPATH": args.baseline}, 0.01)
    names = list(modes)
    rates: dict[str, list[float]] = {name: [] for name in ["raw", *names]}
    cpu: dict[
        str, list[float]
    ] = {}  # egress CPU us per delivery: steadier than rates on a busy box
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: load drift is shared
        rates["raw"].append(await raw_throughput(rx, url, args.events, args.concurrency))
        for name in order:
            menv, sampled = modes[name]
            rates[name].append(
                await egress_throughput(
                    client, rx, menv, settings, args.events, False, args.instances, sampled
                )
            )
            cpu.setdefault(name, []).append(CPU["egress"][-1])
        print(f"  round {r + 1}: " + "  ".join(f"{k} {v[-1]:6.0f}/s" for k, v in rates.items()))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name in ["raw", *names]:
        print(f"{name:>8}: {med[name]:8.0f} deliveries/s (median of {args.rounds})")
    print(f"egress off / raw             : {med['off'] / med['raw']:.2f}")
    print(f"off / no otel   (aim >= 0.98): {med['off'] / med['no otel']:.2f}")
    if args.baseline:
        print(f"off / before    (aim >= 0.98): {med['off'] / med['before']:.2f}")
    print(f"on 1% / off     (aim >= 0.95): {med['on 1%'] / med['off']:.2f}")
    print(f"on 100% / off                : {med['on 100%'] / med['off']:.2f}")
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    print("egress CPU per delivery: " + ", ".join(f"{k} {v:.0f} us" for k, v in mcpu.items()))
    print(
        "as a rate ratio (off's CPU / CPU): "
        + ", ".join(f"{k} {mcpu['off'] / v:.2f}" for k, v in mcpu.items() if k != "off")
    )
    print(f"OTLP bytes received: {(await rx.stats())['otlp']}")
    hot_path_costs(mcpu["off"])


def hot_path_costs(cpu_us: float, n: int = 100_000) -> None:
    """The egress's tracing step per attempt (``services/egress/spans.begin_attempt``),
    timed alone in this process: off, and on at 1 % for an unsampled event; as a share of
    the egress's measured CPU per delivery."""
    import timeit

    from mesh import tracing
    from mesh.envelope import Event
    from services.egress.spans import begin_attempt

    plain = Event(source="shop", type="order.created", data={"i": 1})
    carried = Event(source="shop", type="order.created", data={"i": 1})
    carried.extensions["traceparent"] = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"
    url = "http://127.0.0.1:9/hook"

    def per_call(event: Event) -> float:
        timer = timeit.Timer(lambda: begin_attempt("bench", event, 1, url, "webhook"))
        return min(timer.repeat(5, n)) / n * 1e9  # ns; the least disturbed of 5 runs

    def nothing() -> float:
        timer = timeit.Timer(lambda: None)
        return min(timer.repeat(5, n)) / n * 1e9

    assert tracing.TRACER is None
    empty = nothing()
    rows = [("off, event without context", per_call(plain))]
    rows.append(("off, event with a context", per_call(carried)))
    tracing.TRACER = object()  # "on", the event's context says not sampled: no SDK call
    try:
        rows.append(("on 1%, unsampled event", per_call(carried)))
    finally:
        tracing.TRACER = None
    print(
        f"tracing step per attempt, timed alone ({n:,} calls, best of 5;"
        f" empty call {empty:.0f} ns):"
    )
    for label, ns in rows:
        share = (ns - empty) / 1000 / cpu_us * 100 if cpu_us else 0.0
        print(
            f"  {label:<28} {ns:7.0f} ns  ({share:.3f} % of the egress's {cpu_us:.0f} us/delivery)"
        )


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (about 15 s)")
    p.add_argument("--events", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=200.0, help="events/s for the latency run")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--rounds", type=int, default=None, help="raw/egress rounds (median)")
    p.add_argument("--instances", type=int, default=1, help="egress processes")
    p.add_argument("--profile", action="store_true")
    p.add_argument(
        "--sync",
        choices=["always", "lazy", "both"],
        default="always",
        help="the broker's sync mode (MESH_BROKER_SYNC); both: each in turn, and the ratio",
    )
    p.add_argument("--tracing", action="store_true", help="tracing off vs on (100 %%, 1 %%)")
    p.add_argument("--baseline", help="with --tracing: a checkout whose egress is the reference")
    p.add_argument(
        "--sampled",
        type=float,
        help="every event carries a traceparent, this share of them sampled (with --profile"
        " and OTEL_* set: where a traced egress spends its time)",
    )
    p.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.receiver:
        run_receiver(args.receiver)
        return
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
    if args.events is None:
        args.events = 1000 if args.quick else 5000
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.rounds is None:
        args.rounds = 1 if args.quick or args.profile else 3
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
