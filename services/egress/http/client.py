"""A lean HTTP/1.1 client for webhook POSTs: asyncio.Protocol connections, the httptools
(llhttp) response parser, and a keep-alive pool.

Why not aiohttp's client here: per delivery it cost about a quarter of the egress's CPU
(issue #10); this does the little a webhook POST needs for a third of that. aiohttp stays
for everything else. This module is the pool, resolution and the SSRF check; the wire
(request head, one connection's protocol and parser) is ``services.egress.http.wire``.

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
import socket
import ssl
from collections.abc import Mapping

from mesh.netguard import forbidden_reason, is_forbidden
from services.egress.http.wire import (
    Connection,
    Endpoint,
    InvalidResponse,
    Key,
    Response,
    ServerDisconnected,
    parse_url,
    request_head,
)

__all__ = [
    "DNS_TTL_S",
    "IDLE_TIMEOUT_S",
    "SWEEP_INTERVAL_S",
    "Http1Client",
    "InvalidResponse",
    "RefusedAddress",
    "Response",
    "ServerDisconnected",
]

IDLE_TIMEOUT_S = 30.0  # an idle keep-alive connection older than this is closed
SWEEP_INTERVAL_S = 10.0  # how often idle connections are looked at
DNS_TTL_S = 10.0  # how long a resolution is trusted
_CACHE_MAX = 4096  # parsed URLs / resolutions kept before the cache starts over


class RefusedAddress(OSError):
    """A host resolved to a private/loopback/link-local address (SSRF guard)."""


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
        self._idle: dict[Key, list[Connection]] = {}
        self._idle_count = 0  # entries in _idle (some may have closed meanwhile)
        self._busy = 0  # connections held by requests, connecting ones included
        self._conns: set[Connection] = set()
        self._targets: dict[str, Endpoint] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def connections(self) -> int:
        """Open connections, idle or in use."""
        return len(self._conns)

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        target = self._targets.get(url)
        if target is None:
            target = parse_url(url, self.user_agent)
            if len(self._targets) >= _CACHE_MAX:
                self._targets.clear()
            self._targets[url] = target
        head = request_head(target, headers, len(body))
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

    async def _exchange(self, conn: Connection, head: bytes, body: bytes) -> Response:
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

    def _take_idle(self, key: Key) -> Connection | None:
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

    def _put_idle(self, conn: Connection) -> None:
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

    async def _connect(self, target: Endpoint) -> Connection:
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

    async def _open(self, target: Endpoint) -> Connection:
        loop = asyncio.get_running_loop()
        addresses = await self._resolve(target)
        tls = self._tls() if target.tls else None
        error: OSError | None = None
        for address in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: Connection(target.key, self.max_body, self._conns.discard),
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

    async def _resolve(self, target: Endpoint) -> list[str]:
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
                    raise RefusedAddress(forbidden_reason(host, address))
        return addresses

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context
