"""The wire side of the egress's HTTP/1.1 client: a URL as request line and default
headers, the request head (refusing header injection), and one connection as an
asyncio.Protocol feeding the httptools (llhttp) response parser.

A connection carries one request at a time. Its answer is complete at the end of the
message (Content-Length, chunked) or at EOF (neither); 1xx answers are skipped; a body
past ``max_body`` is cut there and the connection closed rather than drained.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, unquote, urlsplit

import httptools

_DEFAULT_PORTS = {"http": 80, "https": 443}
_FRAMING = frozenset({"content-length", "transfer-encoding"})  # we frame the body ourselves

Key = tuple[str, str, int]


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
    at: float = 0.0  # time.monotonic() when the answer was complete (batch latencies)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What one URL means on the wire, parsed once."""

    key: Key
    host: str  # for DNS and SNI: no brackets, IDNA-encoded
    port: int
    tls: bool
    literal: bool  # an IP address: never resolved
    request_line: str
    defaults: tuple[tuple[str, str], ...]  # (lower-case name, header line) unless given


def parse_url(url: str, user_agent: str) -> Endpoint:
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
    return Endpoint(
        key=(scheme, host, port),
        host=host,
        port=port,
        tls=scheme == "https",
        literal=literal,
        request_line=f"POST {path} HTTP/1.1\r\n",
        defaults=tuple(defaults),
    )


def request_head(target: Endpoint, headers: Mapping[str, str], length: int) -> bytes:
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


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, the answer parsed as it arrives."""

    def __init__(self, key: Key, max_body: int, on_lost: Callable[[Connection], None]) -> None:
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
                at=time.monotonic(),
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
        # A stream transport; not always an asyncio.Transport subclass (uvloop's is not).
        self.transport = cast(asyncio.Transport, transport)

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
