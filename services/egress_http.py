"""The HTTP side of the webhook egress: request bodies, signing, one shared session, the
SSRF guard, and turning a response (or its absence) into an ``AttemptResult``.

The SSRF guard works twice: ``check_destination`` (cached for a few seconds) refuses a
URL whose host resolves to a private, loopback or link-local address before anything is
sent, and the session's resolver refuses such addresses again at connect time, so a DNS
answer that changes between the check and the connection (rebinding) is caught too.
IP-literal hosts never reach a resolver; the first check covers them.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from mesh.envelope import JSON, MSGPACK, Event
from mesh.netguard import DestinationRefused, check_destination, is_forbidden
from mesh.registry import Target
from mesh.resilience import parse_retry_after
from mesh.signing import Signer

USER_AGENT = "mesh-webhook/0.1"
MAX_RESPONSE_BYTES = 256 * 1024  # read at most this much of an answer
ERROR_SNIPPET = 200  # characters of a failed answer kept in the error text
CHECK_TTL_S = 10.0  # how long a destination check is trusted
DNS_TTL_S = 10


class RefusedAddress(OSError):
    """Raised by the resolver; an OSError so aiohttp wraps it as a connector error."""


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default, then refuses private/loopback/link-local answers."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            if is_forbidden(info["host"]):
                raise RefusedAddress(
                    f"destination {host!r} resolves to a private/loopback/link-local address"
                    f" ({info['host']}); set MESH_ALLOW_PRIVATE_TARGETS=1 to allow it"
                )
        return infos

    async def close(self) -> None:
        await self._inner.close()


@dataclass(slots=True)
class AttemptResult:
    """What one HTTP attempt came to."""

    status: int | None = None
    error: str | None = None  # None on 2xx
    retry_after: float | None = None
    latency_s: float = 0.0
    refused: bool = False  # SSRF guard: permanent, never retried
    body: bytes = b""
    content_type: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

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
            "ce-specversion": "1.0",
            "ce-id": event.id,
            "ce-source": event.source,
            "ce-type": event.type,
            "ce-time": rfc3339(event),
        }
        if event.subject:
            headers["ce-subject"] = event.subject
        for name, value in event.extensions.items():
            headers[f"ce-{name}"] = value
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
    return body, {"content-type": JSON}


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


def _refused_cause(exc: BaseException) -> RefusedAddress | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, RefusedAddress):
            return seen
        os_error = getattr(seen, "os_error", None)
        if isinstance(os_error, RefusedAddress):
            return os_error
        seen = seen.__cause__
    return None


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class HttpSender:
    """One aiohttp session for every target: pooled keep-alive connections, no cookies."""

    def __init__(self, allow_private: bool, limit: int = 512) -> None:
        self.guard = DestinationGuard(allow_private)
        self.allow_private = allow_private
        self.limit = limit
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.limit,
                limit_per_host=0,
                ttl_dns_cache=DNS_TTL_S,
                resolver=None if self.allow_private else GuardedResolver(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                headers={"user-agent": USER_AGENT},
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

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
        try:
            async with self.session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as resp:
                answer = await _read_limited(resp, MAX_RESPONSE_BYTES)
                status = resp.status
                result = AttemptResult(
                    status=status,
                    latency_s=time.monotonic() - started,
                    content_type=resp.headers.get("content-type", ""),
                )
                if keep_body:
                    result.body = answer
                if not 200 <= status < 300:
                    result.retry_after = parse_retry_after(resp.headers.get("retry-after"))
                    # One line for the DLQ and the tables: whitespace collapsed, bounded.
                    snippet = " ".join(
                        answer[: ERROR_SNIPPET * 4].decode("utf-8", "replace").split()
                    )[:ERROR_SNIPPET]
                    reason = resp.reason or ""
                    result.error = f"HTTP {status} {reason}".strip() + (
                        f": {snippet}" if snippet else ""
                    )
                return result
        except TimeoutError:
            return AttemptResult(
                error=f"timeout after {timeout:g}s", latency_s=time.monotonic() - started
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            refused = _refused_cause(exc)
            if refused is not None:
                return AttemptResult(error=str(refused), refused=True)
            return AttemptResult(
                error=f"connection error: {_describe(exc)}", latency_s=time.monotonic() - started
            )


def sign_headers(
    signer: Signer, event_id: str, body: bytes, extra: dict[str, str]
) -> dict[str, str]:
    headers = dict(extra)
    headers.update(signer.headers(event_id, body))
    return headers
