"""``post_many``: a chunk of webhook POSTs written at once over the pool (issue #19), against
real servers (the helpers of tests/test_egress_http1.py)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.egress.http.sender import HttpSender
from tests.test_egress_http1 import OK_KEEP, Raw, app_server, client


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    if body == b"slow":
        await asyncio.sleep(1.5)
    elif body.startswith(b"wait"):
        await asyncio.sleep(0.1)  # keeps the warm-up requests on separate connections
    return web.Response(body=body)


async def test_idle_connections_are_reused_and_answers_come_in_order() -> None:
    async with app_server(echo) as srv:
        c = client()
        await asyncio.gather(*(c.post(srv.url, b"wait%d" % i, {}) for i in range(4)))
        assert srv.connections == 4
        answers = await c.post_many(srv.url, [(b"b%d" % i, {}) for i in range(4)], 5.0)
        c.close()
    assert [a.body for a in answers] == [b"b0", b"b1", b"b2", b"b3"]  # type: ignore[union-attr]
    assert srv.connections == 4  # written on the idle ones, none opened


async def test_without_idle_connections_new_ones_are_opened() -> None:
    async with app_server(echo) as srv:
        c = client()
        answers = await c.post_many(srv.url, [(b"a", {}), (b"b", {}), (b"c", {})], 5.0)
        assert c.connections == 3
        c.close()
    assert [a.body for a in answers] == [b"a", b"b", b"c"]  # type: ignore[union-attr]


async def test_a_stale_reused_connection_is_retried_once_fresh() -> None:
    # The second request on any connection is read, then the connection dropped.
    async with Raw(lambda n, _: (OK_KEEP, False) if n == 1 else None) as srv:
        c = client()
        assert (await c.post(srv.url, b"warm", {})).status == 200
        answers = await c.post_many(srv.url, [(b"a", {}), (b"b", {})], 5.0)
        c.close()
    assert [getattr(a, "status", a) for a in answers] == [200, 200]
    # warm-up 1, "a" on the stale one and again fresh 2, "b" fresh 1
    assert (srv.connections, srv.requests) == (3, 4)


async def test_a_timeout_fails_only_the_requests_without_an_answer() -> None:
    async with app_server(echo) as srv:
        sender = HttpSender(allow_private=True)
        await asyncio.gather(*(sender.post(srv.url, b"wait", {}, 5) for _ in range(2)))
        results = await sender.post_many(srv.url, [(b"fast", {}), (b"slow", {})], 0.3)
        assert results[0].ok and results[0].status == 200
        assert results[1].error == "timeout after 0.3s" and results[1].status is None
        assert sender.client.connections == 1  # the timed-out one closed, not left idle
        assert (await sender.post(srv.url, b"again", {}, 5)).ok
        await sender.close()


async def test_a_refused_destination_refuses_the_whole_chunk() -> None:
    sender = HttpSender(allow_private=False)
    results = await sender.post_many("http://127.0.0.1:9/hook", [(b"a", {}), (b"b", {})], 1.0)
    assert all(r.refused and not r.ok for r in results)
    await sender.close()
