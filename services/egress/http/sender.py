"""The HTTP side of the webhook egress: request bodies, signing, one shared client, the
SSRF guard, and turning a response (or its absence) into an ``AttemptResult``.

The SSRF guard works twice: ``check_destination`` (cached for a few seconds) refuses a
URL whose host resolves to a private, loopback or link-local address before anything is
sent, and the client (``services.egress.http.client``) checks every address again when it
connects and connects to the checked one, so a DNS answer that changes between the check
and the connection (rebinding) is caught too.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from mesh import envelope
from mesh.envelope import EXT_TENANT, JSON, MSGPACK, Event
from mesh.netguard import DestinationRefused, check_destination
from mesh.registry import Target
from mesh.resilience import parse_retry_after
from mesh.signing import Signer
from services.egress.http.client import Http1Client, RefusedAddress, Response

USER_AGENT = "mesh-webhook/0.1"
MAX_RESPONSE_BYTES = 256 * 1024  # read at most this much of an answer
ERROR_SNIPPET = 200  # characters of a failed answer kept in the error text
CHECK_TTL_S = 10.0  # how long a destination check is trusted
H_WEBHOOK_TENANT = "webhook-tenant"  # standard format: the tenant of a tenant's event


@dataclass(slots=True)
class AttemptResult:
    """What one delivery attempt came to (HTTP or any other driver): success, a failure
    to retry, or a permanent one (``refused``/``permanent``: dead-lettered at once)."""

    status: int | None = None
    error: str | None = None  # None on 2xx
    retry_after: float | None = None
    latency_s: float = 0.0
    refused: bool = False  # SSRF guard: permanent, never retried
    body: bytes = b""
    content_type: str = ""
    delivered: bool = False  # a non-HTTP driver's success (the system acknowledged it)
    permanent: bool = False  # a failure no retry can fix (missing exchange, queue, bucket)

    @property
    def ok(self) -> bool:
        return self.delivered or (self.status is not None and 200 <= self.status < 300)

    @property
    def gone(self) -> bool:
        return self.status == 410


def rfc3339(event: Event) -> str:
    t = event.time.astimezone(UTC)
    return t.isoformat().replace("+00:00", "Z")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def build_body(target: Target, event: Event) -> tuple[bytes, dict[str, str]]:
    """The request body and its non-signature headers, per the target's format."""
    if target.format == "cloudevents":
        # CloudEvents HTTP binary content mode: attributes as ce-* headers, data as body.
        headers = {
            envelope.H_SPECVERSION: "1.0",
            envelope.H_ID: event.id,
            envelope.H_SOURCE: event.source,
            envelope.H_TYPE: event.type,
            envelope.H_TIME: rfc3339(event),
        }
        if event.subject:
            headers[envelope.H_SUBJECT] = event.subject
        for name, value in event.extensions.items():
            headers[envelope.CE_PREFIX + name] = value
        ctype = event.datacontenttype
        if isinstance(event.data, bytes):
            body = event.data
            headers["content-type"] = ctype if ctype != MSGPACK else "application/octet-stream"
        elif isinstance(event.data, str) and ctype.startswith("text/"):
            body = event.data.encode()
            headers["content-type"] = ctype
        else:
            body = _dumps(event.json_data())
            headers["content-type"] = JSON
        return body, headers
    body = _dumps({"type": event.type, "timestamp": rfc3339(event), "data": event.json_data()})
    headers = {"content-type": JSON}
    tenant = event.extensions.get(EXT_TENANT)
    if tenant is not None:  # a tenant's event (mesh.envelope.outward): its own header
        headers[H_WEBHOOK_TENANT] = tenant
    return body, headers


class DestinationGuard:
    """``check_destination`` with a short cache per scheme/host/port."""

    def __init__(self, allow_private: bool, ttl: float = CHECK_TTL_S) -> None:
        self.allow_private = allow_private
        self.ttl = ttl
        self._cache: dict[tuple[str, str, int | None], tuple[float, str | None]] = {}

    async def refusal(self, url: str) -> str | None:
        """Why ``url`` must not be called, or None."""
        if self.allow_private:
            return None
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "", parts.port)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        reason: str | None = None
        try:
            await check_destination(url, False)
        except DestinationRefused as exc:
            reason = str(exc)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (now + self.ttl, reason)
        return reason


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HttpSender:
    """One lean HTTP/1.1 client for every target: pooled keep-alive connections, no
    cookies, no redirects, the SSRF guard before and at connect time."""

    def __init__(
        self, allow_private: bool, limit: int = 512, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.guard = DestinationGuard(allow_private)
        self.client = Http1Client(
            limit=limit,
            allow_private=allow_private,
            max_body=MAX_RESPONSE_BYTES,
            user_agent=USER_AGENT,
            ssl_context=ssl_context,
        )

    async def close(self) -> None:
        self.client.close()
        await asyncio.sleep(0)  # let the transports finish closing

    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float,
        *,
        keep_body: bool = False,
    ) -> AttemptResult:
        """POST once; never raises for network or HTTP trouble (the result says what)."""
        refusal = await self.guard.refusal(url)
        if refusal is not None:
            return AttemptResult(error=refusal, refused=True)
        started = time.monotonic()
        answer: Response | BaseException
        try:
            async with asyncio.timeout(timeout):
                answer = await self.client.post(url, body, headers)
        except (OSError, ValueError) as exc:  # TimeoutError and RefusedAddress are OSErrors
            answer = exc
        return _result(answer, started, timeout, keep_body)

    async def post_many(
        self, url: str, requests: list[tuple[bytes, dict[str, str]]], timeout: float
    ) -> list[AttemptResult]:
        """POST each ``(body, headers)`` to ``url`` concurrently, within one ``timeout``
        (they start together); one result each, in order (``Http1Client.post_many``)."""
        refusal = await self.guard.refusal(url)
        if refusal is not None:
            return [AttemptResult(error=refusal, refused=True) for _ in requests]
        if len(requests) == 1:
            body, headers = requests[0]
            return [await self.post(url, body, headers, timeout)]
        started = time.monotonic()
        answers = await self.client.post_many(url, requests, timeout)
        return [_result(answer, started, timeout) for answer in answers]


def _result(
    answer: Response | BaseException, started: float, timeout: float, keep_body: bool = False
) -> AttemptResult:
    """An answer (or the error instead of one) as an attempt's result."""
    if isinstance(answer, TimeoutError):
        return AttemptResult(
            error=f"timeout after {timeout:g}s", latency_s=time.monotonic() - started
        )
    if isinstance(answer, RefusedAddress):
        return AttemptResult(error=str(answer), refused=True)
    if isinstance(answer, (OSError, ValueError)):
        return AttemptResult(
            error=f"connection error: {_describe(answer)}", latency_s=time.monotonic() - started
        )
    if isinstance(answer, BaseException):
        raise answer
    status = answer.status
    result = AttemptResult(
        status=status,
        latency_s=(answer.at or time.monotonic()) - started,
        content_type=answer.headers.get("content-type", ""),
    )
    if keep_body:
        result.body = answer.body
    if not 200 <= status < 300:
        result.retry_after = parse_retry_after(answer.headers.get("retry-after"))
        # One line for the DLQ and the tables: whitespace collapsed, bounded.
        snippet = " ".join(answer.body[: ERROR_SNIPPET * 4].decode("utf-8", "replace").split())[
            :ERROR_SNIPPET
        ]
        result.error = f"HTTP {status} {answer.reason}".strip() + (
            f": {snippet}" if snippet else ""
        )
    return result


def sign_headers(
    signer: Signer, event_id: str, body: bytes, extra: dict[str, str]
) -> dict[str, str]:
    headers = dict(extra)
    headers.update(signer.headers(event_id, body))
    return headers
