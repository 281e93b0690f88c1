"""The benchmark suite: each figure with its raw baseline from the same run, and the ratio.

    python -m bench [egress|sink|bridge|peers|publish|latency|fanout|backlog|filters|api|
                     destinations|tenants|backup|all] [--quick] [ARGS]

``--quick`` keeps each bench to about a minute; without it the sizes are the ones in
docs/PERFORMANCE.md. Extra ARGS go to the one bench named (``python -m bench publish
--rounds 5``; ``python -m bench NAME --help`` lists them). egress, sink and bridge are
their own scripts (bench/egress.py, bench/sink.py, bench/bridge.py,
bench/peers.py), run here as
subprocesses; their figures are picked out of their output for the summary.

Every bench starts its own nats-server on a free port in a temporary directory and
never touches a running mesh. Machines are noisy: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType

from bench import _common
from bench._common import ROOT, Result, header, summary

OWN = (
    "publish",
    "latency",
    "fanout",
    "backlog",
    "filters",
    "api",
    "destinations",
    "tenants",
    "backup",
)
SCRIPTS = ("egress", "sink", "bridge", "peers")
ORDER = (
    "publish",
    "latency",
    "fanout",
    "backlog",
    "filters",
    "api",
    "destinations",
    "tenants",
    "backup",
    "egress",
    "sink",
    "bridge",
)
EXTRA = ("peers",)  # not in all: needs the bench extra and Redis


def _module(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"bench.{name}")


# Other engineers' scripts ---------------------------------------------------------


def script_args(name: str, quick: bool) -> list[str]:
    if name == "egress":
        return ["--quick"] if quick else []
    if name == "sink":
        return ["--events", "5000", "--repeat", "1"] if quick else []
    if name == "bridge":
        return ["--clients", "1,10", "--deliveries", "5000"] if quick else []
    if name == "peers":
        return ["--quick"] if quick else []
    raise ValueError(name)


NUM = r"([\d,]+(?:\.\d+)?)"


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def parse_egress(lines: list[str]) -> list[Result]:
    text = "\n".join(lines)
    out: list[Result] = []
    raw = re.search(rf"raw aiohttp POSTs\s*:\s*{NUM}", text)
    egress = re.search(rf"webhook egress\s*:\s*{NUM}", text)
    if raw and egress:
        out.append(
            Result(
                "egress", "egress deliveries/s", _num(egress[1]), "deliv/s",
                _num(raw[1]), "POSTs", ">= 0.8",
            )
        )  # fmt: skip
    lat = re.search(rf"latency at {NUM}/s.*p50 {NUM} ms, p99 {NUM} ms", text)
    if lat:
        out.append(Result("egress", f"p99 at {lat[1]}/s (egress.py)", _num(lat[3]), "ms"))
    return out


def parse_sink(lines: list[str]) -> list[Result]:
    text = "\n".join(lines)
    out: list[Result] = []
    raw = re.search(rf"raw fetch\+ack\s+{NUM} events/s", text)
    for label in ("sqlite", "postgresql"):
        m = re.search(rf"sink -> {label}.*?\s{NUM} events/s\s+ratio ([\d.]+)", text)
        if raw and m:
            out.append(
                Result(
                    "sink", f"sink -> {label}", _num(m[1]), "events/s",
                    _num(raw[1]), "fetch+ack", ">= 0.7", reported_ratio=float(m[2]),
                )
            )  # fmt: skip
    return out


def parse_bridge(lines: list[str]) -> list[Result]:
    out: list[Result] = []
    row = re.compile(rf"^\s*(\d+)\s+(\d+)\s+{NUM}\s+{NUM}\s+{NUM}\s+[\d.]+\s+[\d.]+\s*$")
    for line in lines:
        m = row.match(line)
        if m:
            n, live, raw = int(m[1]), _num(m[3]), _num(m[5])
            out.append(
                Result("bridge", f"{n} WebSocket clients, live", live, "deliv/s", raw, "core-NATS")
            )
    return out


def parse_peers(lines: list[str]) -> list[Result]:
    text = "\n".join(lines)
    out: list[Result] = []
    rates = dict(re.findall(rf"^  ([\w+-]+)\s+{NUM}/s  sender", text, re.MULTILINE))
    if "egress" in rates:
        peers = {k: _num(v) for k, v in rates.items() if k not in ("raw", "egress")}
        if peers:
            best = max(peers, key=lambda k: peers[k])
            out.append(
                Result(
                    "peers", "egress deliveries/s vs best peer", _num(rates["egress"]),
                    "deliv/s", peers[best], best, ">= 1.5",
                )
            )  # fmt: skip
    return out


PARSERS: dict[str, Callable[[list[str]], list[Result]]] = {
    "egress": parse_egress,
    "peers": parse_peers,
    "sink": parse_sink,
    "bridge": parse_bridge,
}


def run_script(name: str, quick: bool, extra: list[str]) -> int:
    script = ROOT / "bench" / f"{name}.py"
    cmd = [sys.executable, str(script), *script_args(name, quick), *extra]
    header(f"{name}: {' '.join(['bench/' + name + '.py', *cmd[2:]])}")
    if not script.exists():
        print(f"  bench/{name}.py is not in this tree", flush=True)
        return 1
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        print(f"  | {line}", flush=True)
    code = proc.wait()
    for result in PARSERS[name](lines):
        _common.RESULTS.append(result)
    if code != 0:
        print(f"  {name} exited with status {code}", flush=True)
    return code


# Entry ----------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        mem = "?"
    try:
        out = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "nats-server"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        version = out.stdout.strip() or "nats-server ?"
    except (OSError, subprocess.SubprocessError):
        version = "nats-server ?"
    uvloop = "installed" if _uvloop_installed() else "not installed"
    return (
        f"{os.cpu_count()} CPUs ({model}), {mem} RAM, Python {platform.python_version()},"
        f" {version}, uvloop {uvloop}"
    )


def _uvloop_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("bench", choices=[*ORDER, *EXTRA, "all"], nargs="?")
    p.add_argument("--quick", action="store_true", help="about a minute per bench")
    p.add_argument("-h", "--help", action="store_true")
    args, extra = p.parse_known_args(argv)
    if args.bench is None or (args.help and args.bench in ("all", *SCRIPTS)):
        p.print_help()
        return 0 if args.help else 2
    if args.help:
        extra.append("--help")
    names = list(ORDER) if args.bench == "all" else [args.bench]
    if args.bench == "all" and extra:
        p.error("extra arguments only with one bench")
    print(machine(), flush=True)
    started = time.monotonic()
    failed: list[str] = []
    for name in names:
        if name in SCRIPTS:
            if run_script(name, args.quick, extra) != 0:
                failed.append(name)
            continue
        mod = _module(name)
        sub = argparse.ArgumentParser(
            prog=f"python -m bench {name}",
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(sub)
        bench_args = sub.parse_args(extra)
        bench_args.quick = args.quick
        try:
            asyncio.run(mod.run(bench_args))
        except SystemExit as exc:
            print(f"  {name} failed: {exc}", flush=True)
            failed.append(name)
    summary()
    print(
        f"\n({time.monotonic() - started:.0f}s{'; failed: ' + ', '.join(failed) if failed else ''})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
