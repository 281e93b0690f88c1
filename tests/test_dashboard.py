"""The dashboard page: self-contained, and live in a real headless Chromium.

The Chromium test runs a small mesh in this process (sink, webhook egress,
health), with a healthy webhook target, one whose receiver is down and a NATS
target nobody consumes, then loads ``/`` in ``chromium --headless`` and asserts
on the DOM the page's JavaScript rendered from ``/status``. A screenshot is kept
in ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mesh.broker import free_port
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.registry import RetryPolicy, Target, TargetKind
from services.health.dashboard import DASHBOARD_HTML
from services.health.service import Health
from tests.support import eventually, migrate, running
from tests.support.receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAS_EGRESS = importlib.util.find_spec("services.egress.service") is not None


# A tiny DOM ------------------------------------------------------------------------

VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "wbr", "source"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        out = list(self.parts)
        for c in self.children:
            out.append(c.text)
        return re.sub(r"\s+", " ", "".join(out)).strip()

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def walk(self) -> list[Node]:
        out = [self]
        for c in self.children:
            out.extend(c.walk())
        return out

    def find(self, tag: str | None = None, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.walk()
            if (tag is None or n.tag == tag) and all(n.attrs.get(k) == v for k, v in attrs.items())
        ]

    def by_id(self, ident: str) -> Node:
        (node,) = self.find(id=ident)
        return node

    def cell(self, cls: str) -> str:
        (node,) = [n for n in self.walk() if n.tag == "td" and cls in n.classes]
        return node.text


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if self.stack[-1].tag not in ("script", "style"):
            self.stack[-1].parts.append(data)


def parse_dom(html: str) -> Node:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root


# Helpers ------------------------------------------------------------------------------


async def chromium(*args: str, profile: Path, timeout: float = 90) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


async def get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, dict(resp.headers), await resp.text()


# The page itself ------------------------------------------------------------------------


def test_page_is_self_contained() -> None:
    page = DASHBOARD_HTML
    assert page.startswith("<!doctype html>")
    # No external assets: nothing loaded from another origin, no src/href at all.
    assert not re.search(r"""(src|href)\s*=""", page)
    assert not re.search(r"""url\(|@import""", page)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched
    # Values are written as text, never parsed as markup.
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page
    assert 'fetch("status"' in page


async def test_served_at_root_with_a_strict_csp(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"db_url": f"sqlite:///{tmp_path / 'mesh.db'}"})
    h = Health(s, host="127.0.0.1")
    async with running(h):
        status, headers, body = await get(h.port, "/")
    assert status == 200 and body == DASHBOARD_HTML
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


# In a real browser --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.skipif(not HAS_EGRESS, reason="needs services/egress/service.py")
async def test_dashboard_shows_live_figures_in_headless_chromium(
    settings: Settings, client: MeshClient, tmp_path: Path
) -> None:
    from services.egress.service import WebhookEgress
    from services.sink.service import Sink

    s = settings.model_copy(
        update={"heartbeat_interval_s": 1.0, "db_url": f"sqlite:///{tmp_path / 'mesh.db'}"}
    )
    await migrate(s.db_url)
    fast = RetryPolicy(base_s=0.05, max_delay_s=0.2, max_retries=100)
    async with Receiver() as rx:
        await client.add_target(Target(name="billing", kind=TargetKind.WEBHOOK, url=rx.url))
        await client.add_target(
            Target(
                name="crm",
                kind=TargetKind.WEBHOOK,
                url=f"http://127.0.0.1:{free_port()}/down",
                timeout_s=1,
                retry=fast,
                circuit_threshold=2,
                circuit_open_s=60,
            )
        )
        await client.add_target(Target(name="ledger", kind=TargetKind.NATS))
        await client.add_propagation("multicast", "shop", ["billing", "crm", "ledger"])
        # One event a filter keeps from billing: its skip and reason show on the page.
        await client.add_propagation("unidirectional", "desk", ["billing"], filter="data.n > 9")
        health = Health(s, host="127.0.0.1")
        async with running(Sink(s), WebhookEgress(s), health):
            for i in range(5):
                await client.publish("shop", "order.created", {"n": i})
            skipped = await client.publish("desk", "memo", {"n": 1})
            await rx.wait_for(5, unique=True, timeout=30)

            async def settled() -> Any:
                _, _, text = await get(health.port, "/status")
                st = json.loads(text)
                rows = {t["name"]: t for t in st["targets"]}
                services = {x["service"] for x in st["services"] if x["state"] == "up"}
                ok = (
                    rows["billing"]["delivered"] == 5
                    and rows["crm"]["circuit"] == "open"
                    and rows["ledger"]["lag"] == 5
                    and {"health", "sink", "webhook-egress"} <= services
                    and st["ready"]["ok"]
                    and any(x["event_id"] == skipped for x in st["recent_skips"])
                )
                return st if ok else None

            await eventually(settled, 45, "a settled mesh in /status", interval=0.2)
            url = f"http://127.0.0.1:{health.port}/"
            html = await chromium(
                "--virtual-time-budget=5000", "--dump-dom", url, profile=tmp_path / "chrome"
            )
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            shot.unlink(missing_ok=True)
            await chromium(
                "--virtual-time-budget=5000",
                f"--screenshot={shot}",
                "--window-size=1280,900",
                url,
                profile=tmp_path / "chrome",
            )

    dom = parse_dom(html)
    assert dom.by_id("conn").text == "live"
    assert dom.by_id("ready").text == "ready"
    assert dom.by_id("open-circuits").text == "1"
    assert dom.by_id("db").text == "ok"
    assert dom.by_id("updated").text != "never"
    assert re.fullmatch(r"\d+\.\d d", dom.by_id("key-age").text)

    (billing,) = dom.by_id("targets").find("tr", **{"data-target": "billing"})
    assert billing.cell("circuit") == "closed"
    assert billing.cell("success") == "100.0 %"
    assert billing.cell("delivered") == "5"
    assert billing.cell("lag") == "0"
    (crm,) = dom.by_id("targets").find("tr", **{"data-target": "crm"})
    assert crm.cell("circuit").startswith("open")
    assert crm.cell("success") == "0.0 %"
    assert int(crm.cell("failed")) >= 2
    (ledger,) = [
        r for r in dom.by_id("targets").find("tr") if r.attrs.get("data-target") == "ledger"
    ]
    assert ledger.cell("lag") == "5" and ledger.cell("kind") == "nats"
    assert ledger.find("polyline"), "the lag sparkline is drawn after a few polls"
    lags = [int(r.cell("lag")) for r in (billing, crm, ledger)]
    assert int(dom.by_id("total-lag").text) == sum(lags) >= 5

    failures = dom.by_id("failures").find("tr", **{"data-target": "crm"})
    assert failures and all(f.cell("event") for f in failures)
    (skip,) = dom.by_id("skips").find("tr", **{"data-target": "billing"})
    assert skip.cell("event") == skipped
    assert "filter of propagation" in skip.cell("reason") and "is false" in skip.cell("reason")
    states = {
        r.attrs["data-service"]: r.cell("state")
        for r in dom.by_id("services").find("tr")
        if "data-service" in r.attrs
    }
    assert {"health", "sink", "webhook-egress"} <= set(states)
    assert states["health"] == "up"

    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
