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
from collections.abc import Mapping, Sequence

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

    def _endpoint(self, url: str) -> Endpoint:
        target = self._targets.get(url)
        if target is None:
            target = parse_url(url, self.user_agent)
            if len(self._targets) >= _CACHE_MAX:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        target = self._endpoint(url)
        return await self._post(target, request_head(target, headers, len(body)), body)

    async def post_many(
        self, url: str, requests: Sequence[tuple[bytes, Mapping[str, str]]], timeout: float
    ) -> list[Response | BaseException]:
        """POST each ``(body, headers)`` to ``url`` at once; one answer or error each, in
        order (``TimeoutError`` for what had no answer within ``timeout``).

        Requests that find an idle keep-alive connection and a free slot are written
        straight away and their answers awaited together: no task per request. The rest
        (new connections, a full pool, a stale connection's one retry) go through
        ``post``'s path, one task each."""
        target = self._endpoint(url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out: list[Response | BaseException | None] = [None] * len(requests)
        heads: list[bytes] = []
        slow: list[int] = []
        wire: dict[asyncio.Future[Response], tuple[int, Connection]] = {}
        for i, (body, headers) in enumerate(requests):
            try:
                heads.append(request_head(target, headers, len(body)))
            except ValueError as exc:
                heads.append(b"")
                out[i] = exc
                continue
            if self._slots.locked():
                slow.append(i)
                continue
            conn = self._take_idle(target.key)
            if conn is None:
                slow.append(i)
                continue
            await self._slots.acquire()  # free (not locked): no suspension
            try:
                wire[conn.send(heads[i], body)] = (i, conn)
            except ServerDisconnected:  # closed while idle: a fresh one instead
                self._busy -= 1
                self._slots.release()
                conn.close(abort=True)
                slow.append(i)
        tasks = {
            asyncio.ensure_future(self._post(target, heads[i], requests[i][0])): i for i in slow
        }
        try:
            waiting: set[asyncio.Future[Response]] = {*wire, *tasks}
            if waiting:
                await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()))
        except BaseException:
            for task in tasks:
                task.cancel()
            for future, (_, conn) in wire.items():
                self._end(conn, future)
            raise
        retry: list[int] = []
        for future, (i, conn) in wire.items():
            answer = self._end(conn, future)
            if isinstance(answer, ServerDisconnected) and not answer.received:
                retry.append(i)  # the server closed the idle connection as we reused it
            else:
                out[i] = answer
        _collect(tasks, out)
        if retry:
            again = {
                asyncio.ensure_future(self._fresh(target, heads[i], requests[i][0])): i
                for i in retry
            }
            try:
                await asyncio.wait(again, timeout=max(0.0, deadline - loop.time()))
            except BaseException:
                for task in again:
                    task.cancel()
                raise
            _collect(again, out)
        return [r if r is not None else TimeoutError() for r in out]

    def _end(self, conn: Connection, future: asyncio.Future[Response]) -> Response | BaseException:
        """Finish an exchange written by ``post_many``: the connection back to the pool
        (or closed), its slot freed; the answer, or the error (a timeout if none came)."""
        self._busy -= 1
        self._slots.release()
        if not future.done():
            future.cancel()  # first: closing must not set an error nobody reads
            conn.close(abort=True)
            return TimeoutError()
        exc = future.exception()
        if exc is not None:
            conn.close(abort=True)
            return exc
        response = future.result()
        self._keep_or_close(conn, response)
        return response

    async def _fresh(self, target: Endpoint, head: bytes, body: bytes) -> Response:
        async with self._slots:
            return await self._exchange(await self._connect(target), head, body)

    async def _post(self, target: Endpoint, head: bytes, body: bytes) -> Response:
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
        self._keep_or_close(conn, response)
        return response

    def _keep_or_close(self, conn: Connection, response: Response) -> None:
        """After an answer: the connection back to the pool, or closed."""
        if conn.reusable and not conn.closed:
            self._put_idle(conn)
        else:
            conn.close(abort=response.truncated)

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


def _collect(
    tasks: Mapping[asyncio.Task[Response], int], out: list[Response | BaseException | None]
) -> None:
    """Each task's answer (or error) into its place in ``out``; a task still running at
    the deadline is cancelled and answers a timeout."""
    for task, i in tasks.items():
        if task.done():
            out[i] = task.exception() or task.result()
        else:
            task.cancel()
            out[i] = TimeoutError()
