"""The streaming bridge against a real nats-server, with real aiohttp WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from mesh import tokens
from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import KeyFileError, MeshError
from mesh.observability import METRICS
from mesh.registry import Target, TargetKind
from services.bridge.service import Bridge, BridgeOptions
from services.bridge.tail import FrameCache
from tests.conftest import env_for
from tests.support import eventually
from tests.support.cli import run_cli
from tests.support.tls import self_signed

TEST_OPTIONS = {
    "host": "127.0.0.1",
    "fetch_expires_s": 0.5,
    "close_timeout_s": 1.0,
    "slow_timeout_s": 2.0,
}


# Fixtures and helpers -----------------------------------------------------------


@pytest.fixture
async def mesh(client: MeshClient) -> MeshClient:
    """A stream target 'screens' that gets everything 'news' broadcasts."""
    await client.add_target(Target(name="screens", kind=TargetKind.STREAM))
    await client.add_propagation("broadcast", "news")
    return client


@pytest.fixture
async def make_bridge(
    settings: Settings, mesh: MeshClient
) -> AsyncIterator[Callable[..., Awaitable[Bridge]]]:
    started: list[Bridge] = []

    async def make(settings_: Settings | None = None, **opts: Any) -> Bridge:
        b = Bridge(settings_ or settings, options=BridgeOptions(**{**TEST_OPTIONS, **opts}))
        await b.start()
        started.append(b)
        return b

    yield make
    for b in started:
        await b.stop()


@pytest.fixture
async def bridge(make_bridge: Callable[..., Awaitable[Bridge]]) -> Bridge:
    return await make_bridge()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # limit=0: every open WebSocket holds a connection from the pool.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


def token(settings: Settings, target: str = "screens", **kw: Any) -> str:
    return tokens.issue(tokens.load_key(tokens.key_path(settings)), target, **kw)


async def connect(
    http: aiohttp.ClientSession, bridge: Bridge, tok: str, target: str = "screens", **params: Any
) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(
        bridge.url,
        params={"target": target, **{k: str(v) for k, v in params.items()}},
        headers={"Authorization": f"Bearer {tok}"},
    )


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
    doc: dict[str, Any] = json.loads(msg.data)
    return doc


async def recv_events(
    ws: aiohttp.ClientWebSocketResponse, n: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        doc = await recv(ws, max(0.1, deadline - time.monotonic()))
        assert "error" not in doc, doc
        out.append(doc)
    return out


async def publish(client: MeshClient, n: int, source: str = "news") -> list[str]:
    return [await client.publish(source, "headline", {"n": i}) for i in range(n)]


def metric(name: str, **labels: str) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


async def settled(client: MeshClient, consumer: str = "deliver-screens") -> None:
    """Wait until the consumer has nothing pending and nothing unacked (acks are async)."""
    deadline = time.monotonic() + 10
    while True:
        info = await client.js.consumer_info(client.names.events, consumer)
        if (info.num_pending, info.num_ack_pending) == (0, 0):
            return
        assert time.monotonic() < deadline, (info.num_pending, info.num_ack_pending)
        await asyncio.sleep(0.05)


# Tokens ----------------------------------------------------------------------------


def test_key_created_private_and_open_key_refused(settings: Settings) -> None:
    path = tokens.key_path(settings)
    key = tokens.load_key(path)
    assert len(key) == tokens.KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.load_key(path) == key  # stable
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="group or others"):
        tokens.load_key(path)


def test_token_claims_and_refusals() -> None:
    key = b"k" * 32
    now = dt.datetime.now(dt.UTC)
    tok = tokens.issue(key, "screens", publish_as=["news", "screens"], now=now)
    claims = tokens.verify(key, tok, "screens")
    assert claims.target == "screens"
    assert claims.publish_as == ("news", "screens")
    assert claims.expires_at - claims.issued_at == tokens.DEFAULT_TTL
    assert tokens.verify(key, tokens.issue(key, "a"), "a").publish_as == ("a",)
    with pytest.raises(tokens.TokenError, match="not valid for target"):
        tokens.verify(key, tok, "other")
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify(b"x" * 32, tok, "screens")
    old = tokens.issue(key, "screens", ttl=dt.timedelta(minutes=1), now=now - dt.timedelta(hours=1))
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(key, old, "screens")
    unsigned = jwt.encode(jwt.decode(tok, options={"verify_signature": False}), None, "none")
    with pytest.raises(tokens.TokenError, match="invalid token"):
        tokens.verify(key, unsigned, "screens")
    foreign = jwt.encode({"sub": "screens", "exp": time.time() + 60}, key, "HS256")
    with pytest.raises(tokens.TokenError, match="invalid token"):
        tokens.verify(key, foreign, "screens")
    with pytest.raises(tokens.TokenError, match="well-formed"):
        tokens.verify(key, "not.a.jwt", "screens")


def test_frame_cache_is_bounded_in_items_and_bytes() -> None:
    cache = FrameCache(max_items=3, max_bytes=800)
    for seq in range(5):
        cache.put(("t", seq), "x" * 10)
    assert len(cache) == 3 and cache.get(("t", 0)) is None and cache.get(("t", 4)) == ("x" * 10,)
    cache.put(("t", 9), None)  # "not for this target" is remembered too
    assert cache.get(("t", 9)) == (None,)
    cache.put(("t", 10), "y" * 99)
    cache.put(("t", 11), "y" * 99)
    assert cache.size <= 800
    cache.put(("t", 12), "z" * 101)  # over an eighth of the budget: not cached at all
    assert cache.get(("t", 12)) is None


# Credentials -------------------------------------------------------------------------


async def test_refused_credentials_get_401_before_upgrade(
    bridge: Bridge, settings: Settings, http: aiohttp.ClientSession
) -> None:
    key = tokens.load_key(tokens.key_path(settings))
    forged = tokens.issue(b"f" * 32, "screens")
    expired = tokens.issue(
        key,
        "screens",
        ttl=dt.timedelta(minutes=1),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
    )
    other = tokens.issue(key, "billing")
    cases = {
        "missing": ({}, "missing credentials"),
        "forged": ({"Authorization": f"Bearer {forged}"}, "signature"),
        "expired": ({"Authorization": f"Bearer {expired}"}, "expired"),
        "other target": ({"Authorization": f"Bearer {other}"}, "not valid for target"),
        "garbage": ({"Authorization": "Bearer abc.def"}, "invalid token"),
        "basic": ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
    }
    for name, (headers, reason) in cases.items():
        # A real upgrade attempt: the handshake fails with 401, no WebSocket is opened.
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(bridge.url, params={"target": "screens"}, headers=headers)
        assert info.value.status == 401, name
        # The same request as plain HTTP shows the reason.
        async with http.get(bridge.url, params={"target": "screens"}, headers=headers) as r:
            assert r.status == 401, name
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            body = await r.json()
            assert reason in body["error"], (name, body)
    assert bridge.stats()["connections"] == 0


async def test_bad_requests_are_refused_with_a_reason(
    bridge: Bridge, settings: Settings, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {token(settings)}"}
    ghost = {"Authorization": f"Bearer {token(settings, 'ghost')}"}
    cases = [
        ({}, auth, 400, "missing ?target"),
        ({"target": "Bad Name"}, auth, 400, "invalid target name"),
        ({"target": "screens", "mode": "firehose"}, auth, 400, "unknown mode"),
        ({"target": "screens", "since_seq": "3"}, auth, 400, "need mode=tail"),
        ({"target": "screens", "mode": "tail", "since_seq": "0"}, auth, 400, ">= 1"),
        ({"target": "screens", "mode": "tail", "since_time": "yesterday"}, auth, 400, "ISO"),
        ({"target": "ghost"}, ghost, 404, "unknown target"),
        ({"target": "screens"}, auth, 426, "WebSocket only"),  # plain GET, valid token
    ]
    for params, headers, status, reason in cases:
        async with http.get(bridge.url, params=params, headers=headers) as r:
            assert r.status == status, params
            assert reason in (await r.json())["error"], params


DOCS = Path(__file__).resolve().parent.parent / "docs" / "WEBSOCKET.md"


def doc_table(heading: str) -> dict[int, str]:
    """``{code: text}`` from the first table after ``heading`` in docs/WEBSOCKET.md."""
    text = DOCS.read_text().split(heading, 1)[1]
    rows: dict[int, str] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[int(cells[0])] = cells[1]
        elif rows and not line.startswith("|"):
            break
    return rows


async def test_unknown_target_and_close_codes_as_the_docs_say(
    bridge: Bridge, settings: Settings, http: aiohttp.ClientSession
) -> None:
    """docs/WEBSOCKET.md: the credential first, so an unknown target is a 404 only with a
    valid token naming it; and its close codes are the bridge's."""
    from services.bridge import frames as bridge_frames

    refusals = doc_table("### Refusals before the upgrade")
    assert "unknown target" in refusals[404] and "another target" in refusals[401]
    cases = [
        ({}, 401),
        ({"Authorization": f"Bearer {token(settings)}"}, 401),  # a token for screens
        ({"Authorization": f"Bearer {token(settings, 'ghost')}"}, 404),
    ]
    for headers, status in cases:
        async with http.get(bridge.url, params={"target": "ghost"}, headers=headers) as r:
            assert r.status == status, headers
            assert (await r.json())["error"], headers
    closes = doc_table("## Close codes")
    assert set(closes) == {
        bridge_frames.CLOSE_GOING_AWAY,
        bridge_frames.CLOSE_REVOKED,
        bridge_frames.CLOSE_ERROR,
        bridge_frames.CLOSE_SLOW,
    }
    assert "revoked" in closes[bridge_frames.CLOSE_REVOKED]
    assert "too slow" in closes[bridge_frames.CLOSE_SLOW]


async def test_valid_token_streams_in_header_or_query(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    ids = await publish(mesh, 3)
    tok = token(settings)
    out_before = metric("mesh_bridge_frames_total", direction="out")
    in_before = metric("mesh_bridge_frames_total", direction="in")
    open_before = metric("mesh_bridge_connections")
    ws = await http.ws_connect(bridge.url, params={"target": "screens", "token": tok})
    frames = await recv_events(ws, 3)
    assert [f["id"] for f in frames] == ids
    first = frames[0]
    assert set(first) >= {"seq", "id", "source", "type", "time", "data", "attempt"}
    assert (first["source"], first["type"], first["data"]) == ("news", "headline", {"n": 0})
    assert first["seq"] < frames[1]["seq"] < frames[2]["seq"]
    assert metric("mesh_bridge_connections") == open_before + 1
    await ws.send_json({"ack": [f["seq"] for f in frames]})
    await ws.close()
    await settled(mesh)
    await eventually(lambda: metric("mesh_bridge_connections") == open_before)
    assert metric("mesh_bridge_frames_total", direction="out") == out_before + 3
    assert metric("mesh_bridge_frames_total", direction="in") == in_before + 1


# Feed: at least once -----------------------------------------------------------------


async def test_feed_redelivers_unacked_frames_to_the_next_connection(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    ids = await publish(mesh, 10)
    tok = token(settings)
    ws = await connect(http, bridge, tok)
    first = await recv_events(ws, 10)
    assert [f["id"] for f in first] == ids
    await ws.send_json({"ack": [f["seq"] for f in first[:4]]})
    await ws.send_json({"ack": 999_999})  # not in flight: an error frame, no harm
    err = await recv(ws)
    assert err["seqs"] == [999_999]
    await ws.close()  # six frames unacked

    ws2 = await connect(http, bridge, tok)
    again = await recv_events(ws2, 6)
    assert sorted(f["id"] for f in again) == sorted(ids[4:])
    assert all(f["attempt"] >= 2 for f in again)
    await ws2.send_json({"ack": [f["seq"] for f in again]})
    more = await publish(mesh, 2)
    last = await recv_events(ws2, 2)
    assert [f["id"] for f in last] == more
    await ws2.send_json({"ack": [f["seq"] for f in last]})
    seen = {f["id"] for f in first[:4] + again + last}
    assert len(seen) == len(ids) + len(more)
    await ws2.close()
    await settled(mesh)


async def test_feed_bounds_frames_in_flight(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    http: aiohttp.ClientSession,
) -> None:
    b = await make_bridge(max_in_flight=4, batch=2)
    ids = await publish(mesh, 9)
    ws = await connect(http, b, token(settings))
    got = await recv_events(ws, 4)
    with pytest.raises(asyncio.TimeoutError):
        await ws.receive(timeout=0.7)  # nothing beyond the bound until an ack
    received = list(got)
    while len(received) < len(ids):
        await ws.send_json({"ack": [f["seq"] for f in got]})
        got = await recv_events(ws, min(2, len(ids) - len(received)))
        received += got
    assert [f["id"] for f in received] == ids
    await ws.close()


async def test_bridge_drain_hands_unacked_frames_back(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    http: aiohttp.ClientSession,
) -> None:
    b1 = await make_bridge()
    ids = await publish(mesh, 5)
    tok = token(settings)
    ws = await connect(http, b1, tok)
    await recv_events(ws, 5)
    await b1.stop()
    closing = await ws.receive(timeout=5)
    assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1001)
    b2 = await make_bridge(settings.model_copy(update={"bridge_port": 0}))
    ws2 = await connect(http, b2, tok)
    # Redelivered, in any order (a nak'ed frame may bounce once more on the way).
    assert sorted(f["id"] for f in await recv_events(ws2, 5)) == sorted(ids)
    await ws2.close()


# Tail: resume -----------------------------------------------------------------------


async def test_tail_resumes_without_skips_or_repeats(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    tok = token(settings)
    ids = await publish(mesh, 6)
    ws = await connect(http, bridge, tok, mode="tail", since_seq=1)
    part1 = await recv_events(ws, 3)
    await ws.close()
    ids += await publish(mesh, 4)  # published while the client is away
    ws = await connect(http, bridge, tok, mode="tail", since_seq=part1[-1]["seq"] + 1)
    part2 = await recv_events(ws, 7)
    with pytest.raises(asyncio.TimeoutError):
        await ws.receive(timeout=0.5)  # and nothing more
    frames = part1 + part2
    assert [f["id"] for f in frames] == ids
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(ids)))
    await ws.send_json({"ack": seqs[-1]})  # acks mean nothing in a tail, and do no harm
    live = await publish(mesh, 1)
    assert (await recv_events(ws, 1))[0]["id"] == live[0]
    await ws.close()
    # A tail reads without consuming: the feed still has every event.
    info = await mesh.js.consumer_info(mesh.names.events, "deliver-screens")
    assert info.num_pending == len(ids) + 1


async def test_live_tails_share_a_reader_and_start_when_they_join(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    tok = token(settings)
    await publish(mesh, 1)  # before anyone listens: no live tail gets it
    a = await connect(http, bridge, tok, mode="tail")
    early = await publish(mesh, 2)
    assert [f["id"] for f in await recv_events(a, 2)] == early
    b = await connect(http, bridge, tok, mode="tail")
    assert bridge.stats()["shared_tails"] == 1
    late = await publish(mesh, 1)
    assert [f["id"] for f in await recv_events(a, 1)] == late
    assert [f["id"] for f in await recv_events(b, 1)] == late
    with pytest.raises(asyncio.TimeoutError):
        await b.receive(timeout=0.5)
    await a.close()
    await b.close()
    await eventually(lambda: bridge.stats()["shared_tails"] == 0)


async def test_tail_from_a_time(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    await publish(mesh, 2)
    await asyncio.sleep(0.05)
    since = dt.datetime.now(dt.UTC)
    await asyncio.sleep(0.05)
    later = await publish(mesh, 2)
    ws = await connect(http, bridge, token(settings), mode="tail", since_time=since.isoformat())
    assert [f["id"] for f in await recv_events(ws, 2)] == later
    await ws.close()


# Publishing over the socket ---------------------------------------------------------------


async def test_publish_over_socket_reaches_a_nats_target(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    await mesh.add_target(Target(name="billing", kind=TargetKind.NATS))
    await mesh.add_propagation("unidirectional", "screens", ["billing"])
    ws = await connect(http, bridge, token(settings))  # may publish as itself
    # A W3C trace context in the frame: the event continues the client's trace.
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    frame = {"type": "order.paid", "data": {"amount": 7}, "ref": 1, "traceparent": parent}
    await ws.send_json({"publish": frame})
    reply = await recv(ws)
    assert reply["ref"] == 1 and reply["published"]["duplicate"] is False
    event_id = reply["published"]["id"]
    # The same id again is stored once (a client may safely retry after a reconnect).
    await ws.send_json({"publish": {"type": "order.paid", "data": {"amount": 7}, "id": event_id}})
    assert (await recv(ws))["published"] == {"id": event_id, "duplicate": True}
    await ws.close()
    it = mesh.consume("billing", expires=0.5)
    delivery = await asyncio.wait_for(anext(it), 10)
    assert (delivery.event.id, delivery.event.source, delivery.event.type) == (
        event_id,
        "screens",
        "order.paid",
    )
    assert delivery.event.data == {"amount": 7}
    assert delivery.event.extensions["traceparent"] == parent
    await delivery.ack()
    await it.aclose()  # type: ignore[attr-defined]


async def test_publish_as_a_source_the_token_does_not_allow_is_refused(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    ws = await connect(http, bridge, token(settings))
    await ws.send_json({"publish": {"type": "fake", "data": 1, "source": "news", "ref": "a"}})
    refused = await recv(ws)
    assert refused["refused"] == "publish" and refused["ref"] == "a"
    assert "may not publish as 'news'" in refused["error"]
    await ws.send_json({"publish": {"type": "bad type!", "data": 1}})
    assert "invalid event type" in (await recv(ws))["error"]
    await ws.send_str("not json")
    assert "JSON" in (await recv(ws))["error"]
    await ws.close()
    # A token that names the source may speak for it.
    ws = await connect(http, bridge, token(settings, publish_as=["news"]))
    await ws.send_json({"publish": {"type": "flash", "data": 2, "source": "news"}})
    assert "published" in await recv(ws)
    await ws.close()
    info = await mesh.js.stream_info(mesh.names.events)
    assert info.state.messages == 1  # only the allowed publish was stored


@pytest.mark.skipif(
    importlib.util.find_spec("services.egress.service") is None,
    reason="services/egress/service.py is not in this build",
)
async def test_publish_over_socket_reaches_a_webhook_target(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    from aiohttp import web

    from mesh.broker import free_port
    from services.egress.service import WebhookEgress

    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    egress = WebhookEgress(settings)
    try:
        await mesh.add_target(
            Target(name="crm", kind=TargetKind.WEBHOOK, url=f"http://127.0.0.1:{port}/hook")
        )
        await mesh.add_propagation("unidirectional", "screens", ["crm"])
        await egress.start()
        ws = await connect(http, bridge, token(settings))
        await ws.send_json({"publish": {"type": "lead.new", "data": {"who": "ada"}}})
        assert "published" in await recv(ws)
        await ws.close()
        await eventually(lambda: bool(got), timeout=15)
        assert got[0]["type"] == "lead.new" and got[0]["data"] == {"who": "ada"}
    finally:
        await egress.stop()
        await runner.cleanup()


# Backpressure ----------------------------------------------------------------------------


async def test_slow_client_is_closed_1013_without_loss(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    http: aiohttp.ClientSession,
) -> None:
    b = await make_bridge(ack_timeout_s=0.5)
    slow_before = metric("mesh_bridge_slow_closes_total")
    ids = await publish(mesh, 12)
    tok = token(settings)
    slow = await connect(http, b, tok)
    # It never reads (and so never acks) until the bridge gives up on it.
    await eventually(lambda: b.stats()["slow_closes"] == 1)
    assert metric("mesh_bridge_slow_closes_total") == slow_before + 1
    buffered = []
    while True:
        msg = await slow.receive(timeout=5)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        buffered.append(json.loads(msg.data))
    # The close frame says why (the client's own close code may read 1006: the bridge
    # stops waiting for a handshake reply from a client that does not read).
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1013)
    assert len(buffered) > 0
    # Everything comes back to the next connection, which keeps up.
    ws = await connect(http, b, tok)
    frames = await recv_events(ws, len(ids))
    await ws.send_json({"ack": [f["seq"] for f in frames]})
    assert sorted(f["id"] for f in frames) == sorted(ids)
    await ws.close()
    await settled(mesh)


async def test_tail_client_with_a_full_queue_is_closed_1013(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    http: aiohttp.ClientSession,
) -> None:
    # A tiny queue and a socket that stops taking data: 40 x 256 KiB fills the kernel buffers.
    b = await make_bridge(send_queue=2, slow_timeout_s=0.5)
    blob = "x" * (256 * 1024)
    for i in range(40):
        await mesh.publish("news", "big", {"i": i, "blob": blob})
    slow = await connect(http, b, token(settings), mode="tail", since_seq=1)
    await eventually(lambda: b.stats()["slow_closes"] == 1, timeout=20)
    seqs = []
    with contextlib.suppress(asyncio.TimeoutError):
        while True:
            msg = await slow.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            seqs.append(json.loads(msg.data)["seq"])
    assert len(seqs) < 40
    # Resume where it stopped: the rest, nothing repeated.
    ws = await connect(http, b, token(settings), mode="tail", since_seq=seqs[-1] + 1 if seqs else 1)
    rest = await recv_events(ws, 40 - len(seqs), timeout=20)
    assert [f["data"]["i"] for f in rest] == list(range(len(seqs), 40))
    await ws.close()
    await slow.close()


async def test_a_slow_live_tail_does_not_hold_back_the_others(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    http: aiohttp.ClientSession,
) -> None:
    # Generous slow_timeout: the fast client shares this busy process and must not look slow.
    b = await make_bridge(send_queue=4, slow_timeout_s=2.0)
    tok = token(settings)
    slow = await connect(http, b, tok, mode="tail")
    fast = await connect(http, b, tok, mode="tail")
    assert b.stats()["shared_tails"] == 1
    reading = asyncio.create_task(recv_events(fast, 40, timeout=60))
    blob = "x" * (256 * 1024)
    for i in range(40):
        await mesh.publish("news", "big", {"i": i, "blob": blob})
    assert [f["data"]["i"] for f in await reading] == list(range(40))
    await eventually(lambda: b.stats()["slow_closes"] == 1, timeout=20)
    got = 0
    while True:
        msg = await slow.receive(timeout=5)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        got += 1
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1013)
    assert got < 40
    await fast.close()


# Fan-out --------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_200_clients_on_one_broadcast_all_receive_every_event(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    # Tail mode: each client reads the whole broadcast. (In feed mode the clients of one
    # target share its single consumer, so they would split the events between them.)
    tok = token(settings)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    for _ in range(0, 200, 25):
        sockets += await asyncio.gather(
            *(connect(http, bridge, tok, mode="tail") for _ in range(25))
        )
    assert bridge.stats()["open"] == 200
    assert bridge.stats()["shared_tails"] == 1  # one consumer feeds them all
    ids = await publish(mesh, 5)
    results = await asyncio.gather(*(recv_events(ws, 5, timeout=60) for ws in sockets))
    for frames in results:
        assert [f["id"] for f in frames] == ids
    await asyncio.gather(*(ws.close() for ws in sockets))
    await eventually(lambda: bridge.stats()["open"] == 0, timeout=30)
    assert bridge.stats()["shared_tails"] == 0


# TLS ----------------------------------------------------------------------------------------------


async def test_tls_when_a_certificate_is_configured(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    import ssl

    cert, key = self_signed(tmp_path, "127.0.0.1")
    b = await make_bridge(
        settings.model_copy(update={"bridge_tls_cert": cert, "bridge_tls_key": key})
    )
    assert b.url.startswith("wss://")
    ctx = ssl.create_default_context(cafile=str(cert))
    ids = await publish(mesh, 1)
    ws = await http.ws_connect(
        b.url,
        params={"target": "screens"},
        headers={"Authorization": f"Bearer {token(settings)}"},
        ssl=ctx,
    )
    frame = (await recv_events(ws, 1))[0]
    assert frame["id"] == ids[0]
    await ws.send_json({"ack": frame["seq"]})
    await ws.close()
    with pytest.raises(aiohttp.ClientError):  # plain ws:// to a TLS port fails
        await http.ws_connect(b.url.replace("wss://", "ws://"), params={"target": "screens"})


# CLI and process ----------------------------------------------------------------------------


async def test_cli_token_issue(mesh: MeshClient, settings: Settings) -> None:
    r = await run_cli(
        settings, "token", "issue", "--target", "screens", "--ttl", "2h",
        "--publish-as", "news", "--publish-as", "screens",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    tok = r.stdout.strip()
    assert "\n" not in tok
    claims = tokens.verify(tokens.load_key(tokens.key_path(settings)), tok, "screens")
    assert claims.publish_as == ("news", "screens")
    assert abs((claims.expires_at - claims.issued_at).total_seconds() - 7200) < 2
    key_file = tokens.key_path(settings)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for args, words in [
        (["--target", "ghost"], "unknown target"),
        (["--target", "screens", "--ttl", "soon"], "invalid duration"),
        (["--target", "Bad!"], "invalid target name"),
        (["--target", "screens", "--publish-as", "a.b"], "invalid source name"),
    ]:
        r = await run_cli(settings, "token", "issue", *args)
        assert r.returncode == 1, (args, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stdout == ""


@pytest.mark.slow
async def test_mesh_serve_bridge_process(
    mesh: MeshClient, settings: Settings, http: aiohttp.ClientSession
) -> None:
    tok = token(settings)
    proc = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child, polled below)
        [sys.executable, "-m", "mesh.cli", "serve", "bridge"],
        env=env_for(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", settings.bridge_port)) == 0

        await eventually(listening, timeout=30)
        ids = await publish(mesh, 2)
        ws = await http.ws_connect(
            f"ws://127.0.0.1:{settings.bridge_port}/v1/stream",
            params={"target": "screens"},
            headers={"Authorization": f"Bearer {tok}"},
        )
        frames = await recv_events(ws, 2)
        assert [f["id"] for f in frames] == ids
        await ws.send_json({"ack": frames[0]["seq"]})  # the second stays unacked
        await asyncio.sleep(0.2)
        proc.terminate()  # SIGTERM: drain closes the socket 1001 and naks the rest
        closing = await ws.receive(timeout=15)
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    it = mesh.consume("screens", expires=0.5)
    d = await asyncio.wait_for(anext(it), 10)
    assert d.event.id == ids[1]
    await d.ack()
    await it.aclose()  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_feed_and_tail_survive_a_broker_restart(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    broker: EmbeddedBroker,
    http: aiohttp.ClientSession,
) -> None:
    b = await make_bridge(tail_heartbeat_s=0.5)
    tok = token(settings)
    first = await publish(mesh, 1)
    feed = await connect(http, b, tok)
    tail = await connect(http, b, tok, mode="tail", since_seq=1)
    got = await recv_events(feed, 1)
    await feed.send_json({"ack": got[0]["seq"]})
    seen = await recv_events(tail, 1)
    await settled(mesh)  # the ack is in before the broker goes down
    await broker.astop()
    await broker.astart()
    await asyncio.wait_for(mesh.connected_event.wait(), 20)
    later: list[str] = []
    deadline = time.monotonic() + 20
    while len(later) < 2:  # JetStream may need a moment after the restart
        try:
            later.append(await mesh.publish("news", "headline", {"after": len(later)}))
        except MeshError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    got += await recv_events(feed, 2, timeout=30)
    for f in got[1:]:
        await feed.send_json({"ack": f["seq"]})
    seen += await recv_events(tail, 2, timeout=30)
    assert [f["id"] for f in got] == first + later
    assert [f["id"] for f in seen] == first + later  # resumed: nothing skipped or repeated
    with pytest.raises(asyncio.TimeoutError):
        await tail.receive(timeout=1.5)
    await feed.close()
    await tail.close()
    await settled(mesh)
