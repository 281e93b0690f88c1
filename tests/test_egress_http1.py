"""The egress's HTTP/1.1 client against real servers on real sockets: aiohttp apps where a
well-behaved server will do, raw asyncio servers where the test needs a server that
misbehaves in one exact way (answers until EOF, says close but stays open, drops a
reused connection)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mesh.broker import free_port
from services.egress.http import client as egress_http1
from services.egress.http.client import Http1Client, RefusedAddress
from services.egress.http.sender import MAX_RESPONSE_BYTES, HttpSender
from tests.support import eventually
from tests.support.tls import self_signed

JSON = {"content-type": "application/json"}


# Servers --------------------------------------------------------------------------


class App:
    """An aiohttp server that records each request and the connection it came on."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.peers: list[Any] = []  # one entry per request
        self.requests: list[web.Request] = []
        self.bodies: list[bytes] = []

    @property
    def connections(self) -> int:
        return len(set(self.peers))


@asynccontextmanager
async def app_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    tls: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
    **runner_kwargs: Any,
) -> AsyncIterator[App]:
    port = free_port()
    app_state = App(f"{'https' if tls else 'http'}://{host}:{port}/hook")

    async def record(request: web.Request) -> web.StreamResponse:
        app_state.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        app_state.requests.append(request)
        app_state.bodies.append(await request.read())
        return await handler(request)

    app = web.Application()
    app.router.add_post("/hook", record)
    runner = web.AppRunner(app, access_log=None, **runner_kwargs)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield app_state
    finally:
        await runner.cleanup()


async def ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


class Raw:
    """A raw asyncio server: ``answer(n_on_connection, request_bytes)`` returns the bytes to
    send back and whether to close the connection afterwards (None: close, say nothing)."""

    def __init__(self, answer: Callable[[int, bytes], tuple[bytes, bool] | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests += 1
                n += 1
                reply = self.answer(n, request)
                if reply is None:
                    break
                data, close = reply
                writer.write(data)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Raw:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def client(limit: int = 8, **kwargs: Any) -> Http1Client:
    options: dict[str, Any] = {
        "limit": limit,
        "allow_private": True,
        "max_body": MAX_RESPONSE_BYTES,
        "user_agent": "test",
    }
    options.update(kwargs)
    return Http1Client(**options)


OK_KEEP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# Pool -----------------------------------------------------------------------------


async def test_sequential_posts_reuse_one_connection() -> None:
    async with app_server(ok) as srv:
        c = client()
        for i in range(5):
            resp = await c.post(srv.url, b"{}", JSON)
            assert (resp.status, resp.body) == (200, b"ok"), i
        c.close()
    assert srv.connections == 1
    assert len(srv.requests) == 5


async def test_concurrency_above_the_limit_waits_for_a_connection() -> None:
    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    async with app_server(slow) as srv:
        c = client(limit=3)
        seen: list[int] = []

        async def one() -> int:
            resp = await c.post(srv.url, b"{}", JSON)
            seen.append(c.connections)
            return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(20)))
        c.close()
    assert statuses == [200] * 20
    assert srv.connections == 3
    assert max(seen) <= 3


async def test_at_the_limit_an_idle_connection_to_another_host_gives_way() -> None:
    async with app_server(ok) as a, app_server(ok) as b:
        c = client(limit=1)
        assert (await c.post(a.url, b"", {})).status == 200
        assert (await c.post(b.url, b"", {})).status == 200
        assert c.connections == 1
        assert (await c.post(a.url, b"", {})).status == 200
        c.close()
    assert a.connections == 2  # its first connection was closed to make room for b


async def test_idle_connections_are_closed_after_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(egress_http1, "IDLE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(egress_http1, "SWEEP_INTERVAL_S", 0.1)
    async with app_server(ok) as srv:
        c = client()
        await c.post(srv.url, b"", {})
        assert c.connections == 1
        await eventually(lambda: c.connections == 0, timeout=3)
        await c.post(srv.url, b"", {})
        c.close()
    assert srv.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with app_server(ok, keepalive_timeout=0.1) as srv:
        c = client()
        await c.post(srv.url, b"", {})
        await eventually(lambda: c.connections == 0, timeout=3)  # EOF seen while idle
        assert (await c.post(srv.url, b"", {})).status == 200
        c.close()
    assert srv.connections == 2
    assert len(srv.requests) == 2


async def test_a_reused_connection_dropped_before_any_answer_is_retried_once_fresh() -> None:
    # The second request on a connection is read, then the connection is dropped: what a
    # server closing an idle connection at the moment we reuse it looks like.
    async with Raw(lambda n, _: (OK_KEEP, False) if n == 1 else None) as srv:
        c = client()
        assert (await c.post(srv.url, b"a", {})).status == 200
        resp = await c.post(srv.url, b"b", {})
        c.close()
    assert resp.status == 200
    assert (srv.connections, srv.requests) == (2, 3)


async def test_a_fresh_connection_dropped_before_any_answer_is_not_retried() -> None:
    async with Raw(lambda n, _: None) as srv:
        c = client()
        with pytest.raises(egress_http1.ServerDisconnected):
            await c.post(srv.url, b"a", {})
        c.close()
    assert srv.requests == 1


async def test_no_retry_once_part_of_the_answer_came() -> None:
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    async with Raw(lambda n, _: (OK_KEEP, False) if n == 1 else (partial, True)) as srv:
        c = client()
        await c.post(srv.url, b"a", {})
        with pytest.raises(egress_http1.ServerDisconnected):
            await c.post(srv.url, b"b", {})
        c.close()
    assert srv.requests == 2


# Responses ------------------------------------------------------------------------


async def test_content_length_response_and_request_framing() -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/x-echo")

    async with app_server(echo) as srv:
        sender = HttpSender(allow_private=True)
        result = await sender.post(srv.url + "?a=1&b=2", b'{"x":1}', JSON, 5, keep_body=True)
        await sender.close()
    assert result.ok
    assert result.body == b'{"x":1}'
    assert result.content_type == "application/x-echo"
    req = srv.requests[0]
    assert req.headers["content-length"] == "7"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"].startswith("mesh-webhook/")
    assert req.headers["host"] == srv.url.split("/")[2]
    assert req.query_string == "a=1&b=2"


async def test_chunked_response() -> None:
    async def chunks(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async with app_server(chunks) as srv:
        c = client()
        first = await c.post(srv.url, b"", {})
        second = await c.post(srv.url, b"", {})
        c.close()
    assert first.headers["transfer-encoding"] == "chunked"
    assert first.body == second.body == b"one,two,three"
    assert srv.connections == 1  # a chunked answer ends cleanly: the connection is kept


async def test_read_until_close_response() -> None:
    async with Raw(lambda n, _: (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nuntil the end", True)) as srv:
        c = client()
        resp = await c.post(srv.url, b"", {})
        c.close()
    assert (resp.status, resp.body, resp.headers["x-a"]) == (200, b"until the end", "1")


async def test_body_over_the_limit_is_truncated_and_the_connection_closed() -> None:
    big = b"x" * (MAX_RESPONSE_BYTES + 100_000)

    async def large(_: web.Request) -> web.Response:
        return web.Response(body=big)

    async with app_server(large) as srv:
        sender = HttpSender(allow_private=True)
        result = await sender.post(srv.url, b"", {}, 5, keep_body=True)
        assert sender.client.connections == 0
        again = await sender.post(srv.url, b"", {}, 5, keep_body=True)
        await sender.close()
    assert result.ok
    assert result.body == big[:MAX_RESPONSE_BYTES]
    assert again.body == big[:MAX_RESPONSE_BYTES]
    assert srv.connections == 2


async def test_connection_close_is_honoured_even_if_the_server_stays_open() -> None:
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with Raw(lambda n, _: (reply, False)) as srv:
        c = client()
        await c.post(srv.url, b"", {})
        await c.post(srv.url, b"", {})
        c.close()
    assert (srv.connections, srv.requests) == (2, 2)


async def test_http10_without_keep_alive_is_not_reused() -> None:
    reply = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with Raw(lambda n, _: (reply, False)) as srv:
        c = client()
        await c.post(srv.url, b"", {})
        await c.post(srv.url, b"", {})
        c.close()
    assert srv.connections == 2


async def test_an_extra_answer_makes_the_connection_unusable() -> None:
    async with Raw(lambda n, _: (OK_KEEP + OK_KEEP, False)) as srv:
        c = client()
        await c.post(srv.url, b"", {})
        await c.post(srv.url, b"", {})
        c.close()
    assert srv.connections == 2


async def test_100_continue_is_skipped() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    async with Raw(lambda n, _: (reply, False)) as srv:
        c = client()
        resp = await c.post(srv.url, b"", {})
        c.close()
    assert (resp.status, resp.reason, resp.body) == (201, "Created", b"done")


async def test_non_2xx_with_retry_after() -> None:
    async def busy(_: web.Request) -> web.Response:
        return web.Response(status=503, text="try  later\n please", headers={"Retry-After": "7"})

    async with app_server(busy) as srv:
        sender = HttpSender(allow_private=True)
        result = await sender.post(srv.url, b"", {}, 5)
        await sender.close()
    assert result.status == 503
    assert result.retry_after == 7
    assert result.error == "HTTP 503 Service Unavailable: try later please"


async def test_redirects_are_not_followed() -> None:
    async def moved(_: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    async with app_server(moved) as srv:
        sender = HttpSender(allow_private=True)
        result = await sender.post(srv.url, b"", {}, 5)
        await sender.close()
    assert result.status == 307
    assert len(srv.requests) == 1


async def test_invalid_response_is_a_connection_error() -> None:
    async with Raw(lambda n, _: (b"SPDY/9 banana\r\n\r\n", True)) as srv:
        sender = HttpSender(allow_private=True)
        result = await sender.post(srv.url, b"", {}, 5)
        await sender.close()
    assert (result.error or "").startswith("connection error: InvalidResponse")


# Requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"x-a": "1\r\nx-evil: 1"},
        {"x-a": "1\nx-evil: 1"},
        {"x-a\r\nx-evil": "1"},
        {"x-a": "1\x00"},
    ],
)
async def test_header_injection_is_refused(headers: dict[str, str]) -> None:
    async with app_server(ok) as srv:
        sender = HttpSender(allow_private=True)
        result = await sender.post(srv.url, b"", headers, 5)
        await sender.close()
    assert (result.error or "").startswith("connection error: ValueError")
    assert srv.requests == []


async def test_userinfo_becomes_basic_auth() -> None:
    async with app_server(ok) as srv:
        c = client()
        url = srv.url.replace("http://", "http://us%40er:p%3Aw@")
        await c.post(url, b"", {})
        c.close()
    header = srv.requests[0].headers["authorization"]
    assert header == "Basic " + base64.b64encode(b"us@er:p:w").decode()
    assert srv.requests[0].headers["host"] == srv.url.split("/")[2]


async def test_ipv6_literal_host() -> None:
    seen: list[bytes] = []

    def answer(n: int, request: bytes) -> tuple[bytes, bool]:
        seen.append(request)
        return OK_KEEP, False

    port = free_port()
    try:
        server = await asyncio.start_server(Raw(answer)._serve, "::1", port)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with server:
        c = client()
        resp = await c.post(f"http://[::1]:{port}/hook", b"", {})
        c.close()
    assert resp.status == 200
    assert f"Host: [::1]:{port}\r\n".encode() in seen[0]


# Failures -------------------------------------------------------------------------


async def test_timeout_closes_the_connection() -> None:
    async def slow(request: web.Request) -> web.Response:
        if request.query.get("slow"):
            await asyncio.sleep(1.5)
        return web.Response(text="ok")

    async with app_server(slow) as srv:
        sender = HttpSender(allow_private=True)
        await sender.post(srv.url, b"", {}, 5)
        result = await sender.post(srv.url + "?slow=1", b"", {}, 0.3)
        assert result.error == "timeout after 0.3s"
        assert result.status is None
        assert sender.client.connections == 0  # closed, not left idle with a late answer
        assert (await sender.post(srv.url, b"", {}, 5)).ok
        await sender.close()
    assert srv.connections == 2


async def test_closing_the_client_fails_requests_in_flight_without_a_retry() -> None:
    async def slow(request: web.Request) -> web.Response:
        if request.query.get("slow"):
            await asyncio.sleep(1.5)
        return web.Response(text="ok")

    async with app_server(slow) as srv:
        c = client()
        await c.post(srv.url, b"", {})
        pending = asyncio.ensure_future(c.post(srv.url + "?slow=1", b"", {}))
        await eventually(lambda: len(srv.requests) == 2)
        c.close()
        with pytest.raises(ConnectionAbortedError):
            await pending
        assert c.connections == 0
    assert srv.connections == 1


async def test_connection_refused() -> None:
    sender = HttpSender(allow_private=True)
    result = await sender.post(f"http://127.0.0.1:{free_port()}/hook", b"", {}, 5)
    await sender.close()
    assert (result.error or "").startswith("connection error: ConnectionRefusedError")
    assert not result.refused


async def test_ssrf_guard_refuses_a_name_resolving_to_loopback() -> None:
    async with app_server(ok) as srv:
        url = srv.url.replace("127.0.0.1", "localhost")
        sender = HttpSender(allow_private=False)
        result = await sender.post(url, b"", {}, 5)
        await sender.close()
        # The client alone (the connect-time check, no DestinationGuard in front).
        c = client(allow_private=False)
        with pytest.raises(RefusedAddress, match="private/loopback/link-local"):
            await c.post(url, b"", {})
        with pytest.raises(RefusedAddress):
            await c.post(srv.url, b"", {})
        c.close()
    assert result.refused
    assert "private/loopback/link-local" in (result.error or "")
    assert srv.requests == []


# TLS ------------------------------------------------------------------------------


def _server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_https_with_a_trusted_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "localhost")
    async with app_server(ok, tls=_server_tls(cert, key), host="localhost") as srv:
        sender = HttpSender(
            allow_private=True, ssl_context=ssl.create_default_context(cafile=str(cert))
        )
        first = await sender.post(srv.url, b"{}", JSON, 5, keep_body=True)
        second = await sender.post(srv.url, b"{}", JSON, 5)
        await sender.close()
    assert first.ok, first.error
    assert first.body == b"ok"
    assert second.ok
    assert srv.connections == 1
    assert srv.requests[0].secure


async def test_https_certificate_checks(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "localhost")
    async with app_server(ok, tls=_server_tls(cert, key)) as srv:
        trusting = HttpSender(
            allow_private=True, ssl_context=ssl.create_default_context(cafile=str(cert))
        )
        # Connecting by IP to a certificate for "localhost": the name does not match.
        mismatch = await trusting.post(srv.url, b"", {}, 5)
        await trusting.close()
        # The default context does not trust a self-signed certificate.
        default = HttpSender(allow_private=True)
        untrusted = await default.post(srv.url.replace("127.0.0.1", "localhost"), b"", {}, 5)
        await default.close()
    assert (mismatch.error or "").startswith("connection error: SSLCertVerificationError")
    assert "mismatch" in (mismatch.error or "") or "match" in (mismatch.error or "")
    assert (untrusted.error or "").startswith("connection error: SSLCertVerificationError")
    assert srv.requests == []
