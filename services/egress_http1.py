"""A lean HTTP/1.1 client for webhook POSTs: asyncio.Protocol connections, the httptools
(llhttp) response parser, and a keep-alive pool.

Why not aiohttp's client here: per delivery it cost about a quarter of the egress's CPU
(issue #10); this does the little a webhook POST needs for a third of that. aiohttp stays
for everything else.

- Pool: idle keep-alive connections per (scheme, host, port), reused last-in first-out,
  closed after ``IDLE_TIMEOUT_S``; at most ``limit`` connections in all (a request waits
  for a slot; an idle connection to another host is closed to make room).
- A request on a reused connection that fails before any byte of the answer arrived
  (the server closed it while idle) is sent once more on a fresh connection, as urllib3
  does; receivers dedupe on ``webhook-id``.
- SSRF guard at connect time: unless ``allow_private``, every address a host resolves to
  is checked with ``is_forbidden`` and the connection goes to the checked address, so an
  answer that changes between the check and the connect (DNS rebinding) cannot slip by.
- The answer's body is kept up to ``max_body`` bytes; past that the connection is closed
  rather than drained.

Errors are ``OSError`` (connect, TLS, lost connection, refused address), ``ValueError``
(a bad URL or header) or ``TimeoutError`` from the caller's ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import httptools

from mesh.netguard import is_forbidden

IDLE_TIMEOUT_S = 30.0  # an idle keep-alive connection older than this is closed
SWEEP_INTERVAL_S = 10.0  # how often idle connections are looked at
DNS_TTL_S = 10.0  # how long a resolution is trusted
_CACHE_MAX = 4096  # parsed URLs / resolutions kept before the cache starts over
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FRAMING = frozenset({"content-length", "transfer-encoding"})  # we frame the body ourselves

Key = tuple[str, str, int]


class RefusedAddress(OSError):
    """A host resolved to a private/loopback/link-local address (SSRF guard)."""


class ServerDisconnected(ConnectionError):
    """The connection ended before a full answer; ``received``: some of it had arrived."""

    def __init__(self, message: str, *, received: bool) -> None:
        super().__init__(message)
        self.received = received


class InvalidResponse(ConnectionError):
    """The answer was not valid HTTP/1.x."""


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes  # at most max_body bytes
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class _Target:
    """What one URL means on the wire, parsed once."""

    key: Key
    host: str  # for DNS and SNI: no brackets, IDNA-encoded
    port: int
    tls: bool
    literal: bool  # an IP address: never resolved
    request_line: str
    defaults: tuple[tuple[str, str], ...]  # (lower-case name, header line) unless given


def _parse(url: str, user_agent: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in URL {url!r}")
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    port = parts.port or _DEFAULT_PORTS[scheme]
    try:
        ipaddress.ip_address(host.split("%")[0])
        literal = True
    except ValueError:
        literal = False
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    authority = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        authority += f":{port}"
    defaults = [("host", f"Host: {authority}\r\n"), ("user-agent", f"User-Agent: {user_agent}\r\n")]
    if parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = base64.b64encode(userinfo.encode()).decode("ascii")
        defaults.append(("authorization", f"Authorization: Basic {token}\r\n"))
    return _Target(
        key=(scheme, host, port),
        host=host,
        port=port,
        tls=scheme == "https",
        literal=literal,
        request_line=f"POST {path} HTTP/1.1\r\n",
        defaults=tuple(defaults),
    )


def _head(target: _Target, headers: Mapping[str, str], length: int) -> bytes:
    lines = [target.request_line]
    given: set[str] = set()
    for name, value in headers.items():
        lower = name.lower()
        if lower in _FRAMING:
            continue
        given.add(lower)
        lines.append(f"{name}: {value}\r\n")
    lines.extend(line for lower, line in target.defaults if lower not in given)
    lines.append(f"Content-Length: {length}\r\n\r\n")
    text = "".join(lines)
    # Every line ends in exactly one CRLF (the last in two): any other CR, LF or a NUL
    # came from a header and would let it inject headers or a request of its own.
    if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1 or "\0" in text:
        for name, value in headers.items():
            if any(c in name or c in value for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: CR, LF or NUL in its name or value")
        raise ValueError("CR, LF or NUL in the URL")
    return text.encode()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, the answer parsed as it arrives."""

    def __init__(self, key: Key, max_body: int, on_lost: Callable[[_Connection], None]) -> None:
        self.key = key
        self._max_body = max_body
        self._on_lost = on_lost
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False  # the last answer was complete and the server keeps alive
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Response] | None = None
        self._received = False
        self._reason = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._interim = False
        self._keep_alive = False

    # The request ---------------------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise ServerDisconnected("connection closed before the request", received=False)
        self._waiter = asyncio.get_running_loop().create_future()
        self._received = False
        self.reusable = False
        self._start()
        transport.write(head + body)
        return self._waiter

    def close(self, *, abort: bool = False) -> None:
        self.closed = True
        self.reusable = False
        self._on_lost(self)
        waiter = self._waiting()
        if waiter is not None:
            # We closed it under a request (the client is closing): not a stale
            # connection, so no retry.
            waiter.set_exception(ConnectionAbortedError("the client closed the connection"))
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def _start(self) -> None:
        self._reason = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._headers_done = False
        self._interim = False

    def _waiting(self) -> asyncio.Future[Response] | None:
        waiter = self._waiter
        return None if waiter is None or waiter.done() else waiter

    def _finish(self, *, reusable: bool, truncated: bool = False) -> None:
        waiter = self._waiting()
        if waiter is None:
            return
        self.reusable = reusable and not self.closed
        waiter.set_result(
            Response(
                status=self._parser.get_status_code(),
                reason=self._reason.decode("latin-1").strip(),
                headers=self._headers,
                body=b"".join(self._body),
                truncated=truncated,
            )
        )
        self._start()  # the answer is handed over: later bytes must not touch it

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiting()
        if waiter is not None:
            waiter.set_exception(exc)
        self.close(abort=True)

    # asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiting() is None:
            # Bytes nobody asked for (while idle, or after we stopped reading): the
            # connection is out of step with the server and cannot be trusted again.
            self.close(abort=True)
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(InvalidResponse("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(InvalidResponse(f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._on_lost(self)
        if self._waiting() is None:
            return
        framed = "content-length" in self._headers or "chunked" in self._headers.get(
            "transfer-encoding", ""
        )
        if exc is None and self._headers_done and not self._interim and not framed:
            self._finish(reusable=False)  # read-until-close body: EOF ends it
            return
        why = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        self._fail(
            ServerDisconnected(
                f"server closed the connection before a full response{why}",
                received=self._received,
            )
        )

    # httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiting() is None:
            self.close(abort=True)  # a second answer to one request: out of step

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._interim = self._parser.get_status_code() < 200
        if not self._interim:
            # Asked here: after the message llhttp has moved on and forgets.
            self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, chunk: bytes) -> None:
        if self._waiting() is None:
            return
        room = self._max_body - self._size
        if len(chunk) > room:
            # Longer than we keep: take what fits, stop reading, never drain the rest.
            if room > 0:
                self._body.append(chunk[:room])
                self._size += room
            self._finish(reusable=False, truncated=True)
            self.close(abort=True)
            return
        self._body.append(chunk)
        self._size += len(chunk)

    def on_message_complete(self) -> None:
        if self._interim:
            self._start()  # 100 Continue and friends: the real answer follows
            return
        self._finish(reusable=self._keep_alive)


class Http1Client:
    """POSTs over pooled keep-alive HTTP/1.1 connections; see the module docstring."""

    def __init__(
        self,
        *,
        limit: int,
        allow_private: bool,
        max_body: int,
        user_agent: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limit = limit
        self.allow_private = allow_private
        self.max_body = max_body
        self.user_agent = user_agent
        self._ssl_context = ssl_context
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[Key, list[_Connection]] = {}
        self._idle_count = 0  # entries in _idle (some may have closed meanwhile)
        self._busy = 0  # connections held by requests, connecting ones included
        self._conns: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def connections(self) -> int:
        """Open connections, idle or in use."""
        return len(self._conns)

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        target = self._targets.get(url)
        if target is None:
            target = _parse(url, self.user_agent)
            if len(self._targets) >= _CACHE_MAX:
                self._targets.clear()
            self._targets[url] = target
        head = _head(target, headers, len(body))
        async with self._slots:
            conn = self._take_idle(target.key)
            if conn is None:
                return await self._exchange(await self._connect(target), head, body)
            try:
                return await self._exchange(conn, head, body)
            except ServerDisconnected as exc:
                if exc.received:
                    raise
            # The server closed the idle connection as we reused it: once more, fresh.
            return await self._exchange(await self._connect(target), head, body)

    def close(self) -> None:
        """Close every connection; requests in flight fail. The client stays usable."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._conns):
            conn.close(abort=True)
        self._idle.clear()
        self._idle_count = 0

    # Connections ----------------------------------------------------------------------

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> Response:
        try:
            response = await conn.send(head, body)
        except BaseException:
            self._busy -= 1
            conn.close(abort=True)
            raise
        self._busy -= 1
        if conn.reusable and not conn.closed:
            self._put_idle(conn)
        else:
            conn.close(abort=response.truncated)
        return response

    def _take_idle(self, key: Key) -> _Connection | None:
        stack = self._idle.get(key)
        if not stack:
            return None
        cutoff = asyncio.get_running_loop().time() - IDLE_TIMEOUT_S
        while stack:
            conn = stack.pop()
            self._idle_count -= 1
            if conn.closed:
                continue
            if conn.idle_since < cutoff:
                conn.close()
                continue
            self._busy += 1
            return conn
        return None

    def _put_idle(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1
        if self._sweeper is None:
            self._sweeper = loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = asyncio.get_running_loop().time() - IDLE_TIMEOUT_S
        for key, stack in list(self._idle.items()):
            keep = [c for c in stack if not c.closed and c.idle_since >= cutoff]
            for conn in stack:
                if conn.idle_since < cutoff:
                    conn.close()
            self._idle_count -= len(stack) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle_count:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep)

    def _evict_one(self) -> None:
        """Close the longest-idle connection, whatever its host, to make room."""
        oldest = min(
            (k for k, stack in self._idle.items() if stack),
            key=lambda k: self._idle[k][0].idle_since,
        )
        stack = self._idle[oldest]
        stack.pop(0).close()
        self._idle_count -= 1
        if not stack:
            del self._idle[oldest]

    async def _connect(self, target: _Target) -> _Connection:
        # We hold a slot, so the others hold at most limit - 1 connections; idle ones
        # (to any host) give way until there is room for ours.
        while self._idle_count and self._busy + self._idle_count >= self.limit:
            self._evict_one()
        self._busy += 1
        try:
            return await self._open(target)
        except BaseException:
            self._busy -= 1
            raise

    async def _open(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        addresses = await self._resolve(target)
        tls = self._tls() if target.tls else None
        error: OSError | None = None
        for address in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(target.key, self.max_body, self._conns.discard),
                    address,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                )
            except ssl.SSLError:
                raise  # the same certificate at every address
            except OSError as exc:
                error = exc
                continue
            self._conns.add(conn)
            return conn
        raise error or OSError(f"no address for {target.host!r}")

    async def _resolve(self, target: _Target) -> list[str]:
        host = target.host
        if target.literal:
            addresses = [host]
        else:
            loop = asyncio.get_running_loop()
            now = loop.time()
            hit = self._dns.get((host, target.port))
            if hit is not None and hit[0] > now:
                addresses = hit[1]
            else:
                infos = await loop.getaddrinfo(host, target.port, type=socket.SOCK_STREAM)
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
                if len(self._dns) >= _CACHE_MAX:
                    self._dns.clear()
                self._dns[(host, target.port)] = (now + DNS_TTL_S, addresses)
        if not self.allow_private:
            for address in addresses:
                if is_forbidden(address):
                    raise RefusedAddress(
                        f"destination {host!r} resolves to a private/loopback/link-local"
                        f" address ({address}); set MESH_ALLOW_PRIVATE_TARGETS=1 to allow it"
                    )
        return addresses

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context
