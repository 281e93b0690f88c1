"""The Redis Streams driver over redis-py's asyncio client: ``XADD`` to a stream-key
template, optionally capped (``MAXLEN ~ n``). A batch is one pipeline: one round trip,
one result per entry.

Format: one stream entry per event, one field per CloudEvents attribute (``specversion``,
``id``, ``source``, ``type``, ``time``, ``subject``, extensions), ``datacontenttype``, and
``data`` (the body as in binary mode). Stream entries are field maps, so a consumer reads
the attributes without parsing a document.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from mesh.destinations import DestinationOptions, render
from mesh.envelope import Event
from mesh.registry import Target
from services.egress.drivers.base import ERROR_CHARS, Driver, describe, need
from services.egress.drivers.formats import attributes, data_body, fields_of
from services.egress.http.sender import AttemptResult


def entry(event: Event) -> dict[str, str | bytes]:
    body, ctype = data_body(event)
    fields: dict[str, str | bytes] = dict(attributes(event))
    fields["datacontenttype"] = ctype
    fields["data"] = body
    return fields


class RedisDriver(Driver):
    kind = "redis"

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target)
        self.url = url
        self.options = target.options or DestinationOptions()
        self._redis: Any = None

    async def _open(self) -> None:
        need("redis", self.kind)
        from redis.asyncio import Redis

        # No socket timeout (redis-py 8's default is 5 s): with one, every response read
        # runs under a timeout of its own and every pipeline's write under
        # ``asyncio.wait_for`` (a task); every send runs under the driver's deadline
        # already, and a send it cuts off closes the client (``drops_connection``).
        client = Redis.from_url(
            self.url, socket_timeout=None, socket_connect_timeout=self.target.timeout_s
        )
        await client.ping()
        self._redis = client

    async def _shut(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    def _xadd_args(self, event: Event) -> tuple[str, dict[str, str | bytes], dict[str, Any]]:
        key = render(self.options.stream, fields_of(event))
        kw: dict[str, Any] = {}
        if self.options.maxlen is not None:
            kw = {"maxlen": self.options.maxlen, "approximate": True}
        return key, entry(event), kw

    async def _send(self, event: Event) -> None:
        key, fields, kw = self._xadd_args(event)
        await self._redis.xadd(key, fields, **kw)

    async def send_batch(
        self, events: Sequence[Event], traces: Sequence[dict[str, str] | None] | None = None
    ) -> list[AttemptResult]:
        """One pipeline (no MULTI): each entry succeeds or fails on its own."""
        started = time.monotonic()
        results: list[AttemptResult | None] = [None] * len(events)
        queued: list[int] = []
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await self.connect()
            pipe = self._redis.pipeline(transaction=False)
            for i, event in enumerate(events):
                try:
                    key, fields, kw = self._xadd_args(event)
                except Exception as exc:
                    results[i] = AttemptResult(error=describe(exc), permanent=True)
                    continue
                pipe.xadd(key, fields, **kw)
                queued.append(i)
            if queued:
                async with asyncio.timeout(self.target.timeout_s):
                    answers = await pipe.execute(raise_on_error=False)
            else:
                answers = []
        except TimeoutError:
            failed = await self._failed(
                TimeoutError(f"timeout after {self.target.timeout_s:g}s"), started
            )
            return [r or failed for r in results]
        except Exception as exc:
            failed = await self._failed(exc, started)
            return [r or failed for r in results]
        latency = time.monotonic() - started
        for i, answer in zip(queued, answers, strict=True):
            if isinstance(answer, Exception):
                results[i] = AttemptResult(
                    error=describe(answer)[:ERROR_CHARS],
                    permanent=self.is_permanent(answer),
                    latency_s=latency,
                )
            else:
                results[i] = AttemptResult(delivered=True, latency_s=latency)
        return [r or AttemptResult(error="not sent") for r in results]

    def is_permanent(self, exc: Exception) -> bool:
        from redis.exceptions import (
            BusyLoadingError,
            DataError,
            NoPermissionError,
            OutOfMemoryError,
            ReadOnlyError,
            ResponseError,
        )

        if isinstance(exc, OutOfMemoryError | ReadOnlyError | BusyLoadingError):
            return False  # the server may recover: retry
        if isinstance(exc, NoPermissionError | DataError):
            return True
        if isinstance(exc, ResponseError):
            # WRONGTYPE (the key holds no stream), ERR (a bad argument): no retry helps.
            text = str(exc)
            return text.startswith(("WRONGTYPE", "ERR")) or "WRONGTYPE" in text
        return super().is_permanent(exc)

    def drops_connection(self, exc: Exception) -> bool:
        from redis.exceptions import ResponseError

        return not isinstance(exc, ResponseError)
