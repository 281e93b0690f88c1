"""Revoking bridge tokens: refused before the upgrade, live sessions closed, every bridge
honours a revocation made anywhere. Real nats-server, real bridges, real aiohttp clients."""

# The bridge fixtures come from test_bridge; pyflakes sees the parameters as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import jwt
import nats.errors as nats_errors
import pytest

from mesh import tokens
from mesh.broker import EmbeddedBroker
from mesh.cli import main as cli_main
from mesh.client import MeshClient
from mesh.config import Settings
from mesh.errors import MeshError
from mesh.registry import Target, TargetKind
from mesh.revocations import Revocation, RevocationKind, RevocationStore, RevocationView
from services.bridge.frames import CLOSE_REVOKED
from services.bridge.service import Bridge
from tests.support import eventually
from tests.support.cli import ok, one_line_error, run_cli
from tests.test_bridge import (  # noqa: F401 (fixtures, used as parameters)
    bridge,
    connect,
    http,
    make_bridge,
    mesh,
    publish,
    recv_events,
    settled,
    token,
)


def claims_of(settings: Settings, tok: str, target: str = "screens") -> tokens.TokenClaims:
    return tokens.verify(tokens.load_key(tokens.key_path(settings)), tok, target)


async def store_of(client: MeshClient) -> RevocationStore:
    return await RevocationStore.open(client.port, client.names.revoked)


async def refused(
    http: aiohttp.ClientSession, bridge: Bridge, tok: str, target: str = "screens"
) -> str:
    """The reason a real upgrade attempt is refused with 401 (asserted), from the body."""
    params, headers = {"target": target}, {"Authorization": f"Bearer {tok}"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(bridge.url, params=params, headers=headers)
    assert info.value.status == 401
    async with http.get(bridge.url, params=params, headers=headers) as r:
        assert r.status == 401
        reason: str = (await r.json())["error"]
    return reason


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> str:
    """Read to the close frame (a feed may still send frames first); it must be 1008."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            continue
        assert msg.type == aiohttp.WSMsgType.CLOSE, (msg.type, msg.data)
        assert msg.data == CLOSE_REVOKED, (msg.data, msg.extra)
        return str(msg.extra)


# Tokens and entries, no broker ------------------------------------------------------------


def test_token_times_are_to_the_millisecond_and_lifetimes_are_bounded() -> None:
    key = b"k" * 32
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678_900, tzinfo=dt.UTC)
    claims = tokens.verify(key, tokens.issue(key, "screens", now=now), "screens", now=now)
    assert claims.issued_at == now.replace(microsecond=679_000)
    assert len(claims.jti) == 32 and tokens.validate_jti(claims.jti) == claims.jti
    with pytest.raises(tokens.TokenError, match="at most 366 days"):
        tokens.issue(key, "screens", ttl=dt.timedelta(days=367))
    t = time.time()
    claims_doc = {"iss": "mesh", "aud": "mesh-bridge", "sub": "screens", "jti": "a" * 32}
    forever = jwt.encode({**claims_doc, "iat": t, "exp": t + 400 * 86400}, key, "HS256")
    with pytest.raises(tokens.TokenError, match="longer than 366 days"):
        tokens.verify(key, forever, "screens")
    for bad in ("", "xyz", "A" * 32, "a" * 31, "g" * 32, "a" * 32 + "\n"):
        with pytest.raises(tokens.TokenError, match="invalid token id"):
            tokens.validate_jti(bad)


def test_a_revocation_covers_its_token_or_what_its_target_issued_before() -> None:
    key = b"k" * 32
    cut = dt.datetime.now(dt.UTC)
    before = tokens.verify(key, tokens.issue(key, "a", now=cut - dt.timedelta(seconds=1)), "a")
    after = tokens.verify(key, tokens.issue(key, "a", now=cut + dt.timedelta(milliseconds=2)), "a")
    other = tokens.verify(key, tokens.issue(key, "b", now=cut - dt.timedelta(seconds=1)), "b")
    common = {"revoked_at": cut, "kept_until": cut + dt.timedelta(days=1)}
    one = Revocation(kind=RevocationKind.TOKEN, id=before.jti, reason="leaked", **common)
    assert one.covers(before) and not one.covers(after)
    assert one.describe() == "token revoked: leaked"
    every = Revocation(kind=RevocationKind.TARGET, id="a", not_before=cut, **common)
    assert every.covers(before) and not every.covers(after) and not every.covers(other)
    view = RevocationView()
    view.apply(every)
    assert view.refusal(before) is every and view.refusal(after) is None
    gone = Revocation(
        kind=RevocationKind.TOKEN, id=after.jti, revoked_at=cut, kept_until=cut, reason=""
    )
    view.apply(gone, now=cut + dt.timedelta(seconds=1))  # expired entries are forgotten
    assert view.refusal(after) is None and len(view) == 1


def test_a_target_revocation_covers_its_tenants_tokens_only() -> None:
    """Tenants T and U (and the default tenant) may each hold a target `orders`: revoking
    one's leaves the others' tokens alone; an entry from before tenants (no tenant)
    still covers every tenant's, as it did when it was written."""
    key = b"k" * 32
    cut = dt.datetime.now(dt.UTC)
    early = cut - dt.timedelta(seconds=1)

    def claims(tenant: str) -> tokens.TokenClaims:
        return tokens.verify(key, tokens.issue(key, "orders", now=early, tenant=tenant), "orders")

    t, u, d = claims("t"), claims("u"), claims("default")
    common = {"revoked_at": cut, "kept_until": cut + dt.timedelta(days=1), "not_before": cut}
    of_t = Revocation(kind=RevocationKind.TARGET, id="orders", tenant="t", **common)
    assert (of_t.key, of_t.target) == ("target.t.orders", "~t.orders")
    assert of_t.covers(t) and not of_t.covers(u) and not of_t.covers(d)
    assert "target ~t.orders:" in of_t.describe()
    of_d = Revocation(kind=RevocationKind.TARGET, id="orders", tenant="default", **common)
    assert (of_d.key, of_d.target) == ("target.orders", "orders")
    assert of_d.covers(d) and not of_d.covers(t)
    legacy = Revocation.model_validate_json(
        json.dumps(
            {"kind": "target", "id": "orders", **{k: v.isoformat() for k, v in common.items()}}
        )
    )
    assert legacy.tenant is None and legacy.key == "target.orders"
    assert legacy.covers(t) and legacy.covers(u) and legacy.covers(d)
    view = RevocationView()
    view.apply(of_t)
    assert view.refusal(t) is of_t and view.refusal(u) is None and view.refusal(d) is None
    view.apply(legacy)  # under the plain name: found for a tenant's token too
    assert view.refusal(u) is legacy


async def test_revoking_a_tenants_target_in_the_bucket_spares_the_other_tenants(
    mesh: MeshClient,
) -> None:
    key = b"k" * 32
    store = await store_of(mesh)
    rev = await store.revoke_target("orders", tenant="t", reason="rotation")
    early = rev.revoked_at - dt.timedelta(seconds=1)

    def claims(tenant: str) -> tokens.TokenClaims:
        return tokens.verify(key, tokens.issue(key, "orders", now=early, tenant=tenant), "orders")

    found = await store.refusal(claims("t"))
    assert found is not None and found.target == "~t.orders"
    assert await store.refusal(claims("u")) is None
    assert await store.refusal(claims("default")) is None
    await store.revoke_target("orders")  # the default tenant's
    assert await store.refusal(claims("u")) is None
    assert (await store.refusal(claims("default"))) is not None
    assert {r.key for r in await store.list()} == {"target.t.orders", "target.orders"}


# Against a bridge -------------------------------------------------------------------------


async def test_revoked_token_is_refused_401_with_the_reason(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    leaked, kept = token(settings), token(settings)
    store = await store_of(mesh)
    rev, new = await store.revoke_token(claims_of(settings, leaked).jti, reason="leaked in #42")
    assert new and rev.kind == RevocationKind.TOKEN
    assert (await store.revoke_token(rev.id))[1] is False  # again: no new entry
    assert await refused(http, bridge, leaked) == "token revoked: leaked in #42"
    assert bridge.stats()["connections"] == 0
    ids = await publish(mesh, 2)
    ws = await connect(http, bridge, kept)  # another token of the same target still works
    frames = await recv_events(ws, 2)
    assert [f["id"] for f in frames] == ids
    await ws.send_json({"ack": [f["seq"] for f in frames]})
    await ws.close()
    await settled(mesh)


async def test_live_sessions_closed_on_revoke_and_unacked_frames_come_back(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    leaked, other = token(settings), token(settings)
    ids = await publish(mesh, 5)
    feed = await connect(http, bridge, leaked)
    frames = await recv_events(feed, 5)
    await feed.send_json({"ack": [f["seq"] for f in frames[:2]]})
    tail = await connect(http, bridge, leaked, mode="tail", since_seq=1)
    await recv_events(tail, 5)
    bystander = await connect(http, bridge, other, mode="tail")  # live: from now on

    await (await store_of(mesh)).revoke_token(claims_of(settings, leaked).jti, reason="lost")
    assert await closed_with(feed) == "token revoked: lost"
    assert await closed_with(tail) == "token revoked: lost"
    assert bridge.stats()["revoked_closes"] == 2

    # The three unacked frames come again to the next connection; the other token's
    # session never noticed.
    fresh = await connect(http, bridge, token(settings))
    again = await recv_events(fresh, 3)
    assert sorted(f["id"] for f in again) == sorted(ids[2:])
    assert all(f["attempt"] >= 2 for f in again)
    await fresh.send_json({"ack": [f["seq"] for f in again]})
    [late] = await publish(mesh, 1)
    assert [f["id"] for f in await recv_events(bystander, 1)] == [late]
    [frame] = await recv_events(fresh, 1)
    assert frame["id"] == late
    await fresh.send_json({"ack": frame["seq"]})
    await settled(mesh)
    await fresh.close()
    await bystander.close()


async def test_revoke_all_of_a_target_spares_tokens_issued_after_and_other_targets(
    bridge: Bridge, settings: Settings, mesh: MeshClient, http: aiohttp.ClientSession
) -> None:
    await mesh.add_target(Target(name="wall", kind=TargetKind.STREAM))
    live, idle, wall = token(settings), token(settings), token(settings, "wall")
    ws = await connect(http, bridge, live, mode="tail")
    rev = await (await store_of(mesh)).revoke_target("screens", reason="rotation")
    assert rev.not_before is not None
    cut = rev.not_before.isoformat(timespec="seconds")
    assert await closed_with(ws) == (
        f"token revoked (target screens: all tokens issued before {cut}): rotation"
    )
    assert "target screens: all tokens issued before" in await refused(http, bridge, idle)
    newer = token(settings)  # issued after the revocation, even within the same second
    assert claims_of(settings, newer).issued_at >= rev.not_before
    ids = await publish(mesh, 1)
    ws2 = await connect(http, bridge, newer)
    [frame] = await recv_events(ws2, 1)
    assert frame["id"] == ids[0]
    await ws2.send_json({"ack": frame["seq"]})
    other = await connect(http, bridge, wall, target="wall", mode="tail")
    assert not other.closed
    await other.close()
    await ws2.close()
    await settled(mesh)


async def test_cli_revocation_reaches_every_running_bridge(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    http: aiohttp.ClientSession,
) -> None:
    one = await make_bridge()
    two = await make_bridge(settings.model_copy(update={"bridge_port": 0}))
    issued, plain, malformed, ghost = await asyncio.gather(
        run_cli(settings, "token", "issue", "--target", "screens", "--json"),
        run_cli(settings, "token", "issue", "--target", "screens"),
        run_cli(settings, "token", "revoke", "xyz"),
        run_cli(settings, "token", "revoke", "--target", "ghost", "--all"),
    )
    doc = json.loads(ok(issued).stdout)
    assert claims_of(settings, doc["token"]).jti == doc["jti"]
    other = ok(plain).stdout.strip()
    assert claims_of(settings, other).jti in plain.stderr  # the id, beside the token alone
    # Bad input: one line, non-zero, and nothing revoked.
    one_line_error(malformed, "invalid token id 'xyz'", "32 hex digits")
    one_line_error(ghost, "unknown target 'ghost'")
    assert await (await store_of(mesh)).list() == []
    assert "no revoked tokens" in ok(await run_cli(settings, "token", "list-revoked")).stdout

    on_one = await connect(http, one, doc["token"])
    on_two = await connect(http, two, doc["token"], mode="tail")
    revoked = ok(await run_cli(settings, "token", "revoke", doc["jti"], "--reason", "stolen"))
    assert doc["jti"] in revoked.stdout
    assert await closed_with(on_one) == "token revoked: stolen"
    assert await closed_with(on_two) == "token revoked: stolen"
    for b in (one, two):
        assert await refused(http, b, doc["token"]) == "token revoked: stolen"
        ws = await connect(http, b, other, mode="tail")
        assert not ws.closed
        await ws.close()

    every, listed = await asyncio.gather(
        run_cli(settings, "token", "revoke", "--target", "screens", "--all"),
        run_cli(settings, "token", "list-revoked", "--json"),
    )
    assert "every token of target screens issued before" in ok(every).stdout
    assert "target screens: all tokens issued before" in await refused(http, two, other)
    assert ("token", doc["jti"], "stolen") in {
        (r["kind"], r["id"], r["reason"]) for r in json.loads(ok(listed).stdout)
    }
    assert {(r.kind, r.id) for r in await (await store_of(mesh)).list()} == {
        (RevocationKind.TOKEN, doc["jti"]),
        (RevocationKind.TARGET, "screens"),
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["revoke", "A" * 32], "32 hex digits"),
        (["revoke", "0" * 32, "--reason", "x" * 201], "at most 200"),
        (["revoke", "--target", "Bad!", "--all"], "invalid target name"),
        (["revoke", "--target", "screens"], "--target needs --all"),
        (["revoke", "--all"], "--all needs --target"),
        (["revoke"], "give the token id to revoke"),
        (["revoke", "0" * 32, "--target", "screens", "--all"], "not both"),
        (["revoke", "0" * 32, "--reason", "two\nlines"], "one line"),
        (["issue", "--target", "screens", "--ttl", "400d"], "at most 366d"),
    ],
)
def test_token_commands_refuse_bad_input_before_connecting(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process (no broker is reachable at the default URL): each is caught up front.
    with pytest.raises(SystemExit) as info:
        cli_main(["token", *args])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mesh: error: "), err
    assert expected in err


async def test_a_revocation_goes_once_its_token_has_expired(mesh: MeshClient) -> None:
    store = await store_of(mesh)
    now = dt.datetime.now(dt.UTC)
    # Expired 4.5 s ago: kept for the 5 s leeway, so the entry has a TTL of about a second.
    await store.revoke_token("1" * 32, expires_at=now - dt.timedelta(seconds=4.5), now=now)
    await store.revoke_token("2" * 32)
    assert {r.id for r in await store.list()} == {"1" * 32, "2" * 32}

    async def only_the_live_one() -> bool:
        return {r.id for r in await store.list()} == {"2" * 32}

    await eventually(only_the_live_one, timeout=15, what="the expired entry to go")


async def test_a_session_admitted_while_a_revocation_lands_is_closed(
    bridge: Bridge, settings: Settings, http: aiohttp.ClientSession
) -> None:
    # The bucket read at admission found nothing, but the watch has the revocation by the
    # time the session registers (written in between): the session closes itself.
    tok = token(settings)
    now = dt.datetime.now(dt.UTC)
    bridge.revoked.apply(
        Revocation(
            kind=RevocationKind.TOKEN,
            id=claims_of(settings, tok).jti,
            reason="raced",
            revoked_at=now,
            kept_until=now + dt.timedelta(hours=1),
        )
    )
    ws = await connect(http, bridge, tok, mode="tail")
    assert await closed_with(ws) == "token revoked: raced"


@pytest.mark.slow
async def test_revocation_after_a_broker_restart_still_closes_sessions(
    make_bridge: Callable[..., Awaitable[Bridge]],
    settings: Settings,
    mesh: MeshClient,
    broker: EmbeddedBroker,
    http: aiohttp.ClientSession,
) -> None:
    b = await make_bridge(tail_heartbeat_s=0.5)
    tok = token(settings)
    ws = await connect(http, b, tok, mode="tail")
    store = await store_of(mesh)
    await broker.astop()
    await broker.astart()
    await asyncio.wait_for(mesh.connected_event.wait(), 20)
    await eventually(lambda: b.client.reconnects >= 1, timeout=20, what="the bridge to reconnect")
    deadline = time.monotonic() + 20
    while True:  # JetStream may need a moment after the restart
        try:
            await store.revoke_token(claims_of(settings, tok).jti, reason="after restart")
            break
        except (MeshError, nats_errors.Error) as exc:
            assert time.monotonic() < deadline, exc
            await asyncio.sleep(0.2)
    assert await closed_with(ws, timeout=30) == "token revoked: after restart"
