"""A real aiohttp webhook receiver for tests, programmable per test.

::

    async with Receiver() as rx:
        rx.fail_first(2, status=503)             # then the default (200)
        rx.script(Reply(429, headers={"Retry-After": "1"}), Reply(410))
        rx.handler = lambda req: Reply(500) if req.webhook_id == bad else None
        ... point a target at rx.url ...
        await rx.wait_for(3)                     # 3 requests (or unique=True: 3 ids)
        gaps = rx.gaps()                         # seconds between consecutive requests

Every request is recorded with a monotonic arrival time, its headers and body, and the
status it was answered with (None when the connection was reset or the client left).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mesh.broker import free_port
from tests.support import eventually as eventually  # re-exported for the egress tests


@dataclass
class Reply:
    """What the receiver answers: a status, headers, a body; or a stall, or a reset."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0  # seconds to stall before answering
    reset: bool = False  # drop the connection instead of answering


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int | None = None  # what it was answered with; None: reset / not answered

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An aiohttp server on a free loopback port, recording every request."""

    def __init__(self, default: Reply | None = None, path: str = "/hook") -> None:
        self.default = default or Reply()
        self.path = path
        self.port = free_port()
        self.requests: list[Received] = []
        self.handler: Callable[[Received], Reply | None] | None = None
        self._script: deque[Reply] = deque()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    # Programming ---------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order, then with the default."""
        self._script.extend(replies)

    def fail_first(self, k: int, status: int = 500, headers: dict[str, str] | None = None) -> None:
        self.script(*(Reply(status, headers=dict(headers or {})) for _ in range(k)))

    def set_default(self, reply: Reply) -> None:
        self.default = reply

    # Lifecycle -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def start(self) -> Receiver:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Serving -------------------------------------------------------------------

    def _choose(self, rec: Received) -> Reply:
        if self.handler is not None:
            chosen = self.handler(rec)
            if chosen is not None:
                return chosen
        if self._script:
            return self._script.popleft()
        return self.default

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Received(
            at=time.monotonic(),
            wall=time.time(),
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(rec)
        self._changed.set()
        reply = self._choose(rec)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.reset:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # aiohttp drops the handler quietly
            rec.status = reply.status
            return web.Response(status=reply.status, headers=reply.headers, body=reply.body)
        finally:
            self.in_flight -= 1
            self._changed.set()

    # Reading -------------------------------------------------------------------

    def ids(self) -> list[str]:
        return [r.webhook_id for r in self.requests if r.webhook_id]

    def unique_ids(self) -> set[str]:
        return set(self.ids())

    def for_id(self, webhook_id: str) -> list[Received]:
        return [r for r in self.requests if r.webhook_id == webhook_id]

    def gaps(self, requests: list[Received] | None = None) -> list[float]:
        reqs = self.requests if requests is None else requests
        return [b.at - a.at for a, b in itertools.pairwise(reqs)]

    async def wait_for(
        self,
        count: int,
        timeout: float = 10.0,
        *,
        unique: bool = False,
        where: Callable[[Received], bool] | None = None,
    ) -> list[Received]:
        """Wait until ``count`` requests (or unique webhook ids) arrived; raise on timeout."""
        deadline = time.monotonic() + timeout

        def seen() -> int:
            reqs = [r for r in self.requests if where is None or where(r)]
            return len({r.webhook_id for r in reqs}) if unique else len(reqs)

        while seen() < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"receiver got {seen()} of {count} {'unique ids' if unique else 'requests'}"
                    f" within {timeout}s"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return list(self.requests)


# Helpers for egress tests ---------------------------------------------------------


def new_secret() -> str:
    """A ``whsec_`` secret in the form the spec (and the reference library) expects."""
    import base64
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def fast_policy(**overrides: Any) -> Any:
    """A retry policy with small delays so tests stay quick."""
    from mesh.registry import RetryPolicy

    doc: dict[str, Any] = {
        "base_s": 0.05,
        "multiplier": 2.0,
        "max_delay_s": 0.5,
        "max_retries": 3,
        "jitter": 0.1,
    }
    doc.update(overrides)
    return RetryPolicy(**doc)


async def add_webhook(
    client: Any,
    name: str,
    url: str,
    *,
    source: str = "shop",
    secret: str | None = None,
    **fields: Any,
) -> str:
    """Register a webhook target fed by ``source``; returns its secret."""
    from mesh.registry import Target, TargetKind

    secret = secret or new_secret()
    fields.setdefault("retry", fast_policy())
    fields.setdefault("timeout_s", 5.0)
    fields.setdefault("circuit_open_s", 1.0)
    fields.setdefault("circuit_threshold", 50)
    await client.add_target(Target(name=name, kind=TargetKind.WEBHOOK, url=url, **fields), secret)
    await client.add_propagation("unidirectional", source, [name])
    return secret


async def read_stream(client: Any, stream: str, subject: str | None = None) -> list[Any]:
    """Every message in a stream (optionally one subject), oldest first."""
    import nats.js.errors as js_errors

    out = []
    info = await client.js.stream_info(stream)
    if not info.state.messages:
        return out
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        try:
            msg = await client.js.get_msg(stream, seq)
        except js_errors.NotFoundError:
            continue
        if subject is None or msg.subject == subject:
            out.append(msg)
    return out


async def dead_letters(client: Any, target: str) -> list[Any]:
    from mesh.records import parse_dead_letter

    msgs = await read_stream(client, client.names.dlq, client.subjects.dlq(target))
    return [parse_dead_letter(m.headers, m.data) for m in msgs]


async def delivery_records(client: Any, target: str) -> list[Any]:
    from mesh.records import read_records

    msgs = await read_stream(client, client.names.sys, client.subjects.delivery(target))
    return [rec for m in msgs for rec in read_records(m.data)]  # batches or single records
