"""The webhook driver: a signed POST over the egress's shared HTTP client.

The HTTP specifics (bodies, Standard Webhooks signing, the SSRF guard, status codes,
``Retry-After``, 410 Gone) stay here and in services/egress/http/; the worker above
treats it as any other driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mesh.envelope import Event
from mesh.errors import DecodeError, ValidationError
from mesh.registry import Target
from mesh.signing import Signer
from services.egress.drivers.base import Driver
from services.egress.http.sender import AttemptResult, HttpSender, build_body, sign_headers


class WebhookDriver(Driver):
    kind = "webhook"

    def __init__(self, target: Target, http: HttpSender, signer: Callable[[], Signer]) -> None:
        super().__init__(target)
        self.http = http
        self.signer = signer

    def ready(self) -> str | None:
        try:
            self.signer()
        except (ValidationError, DecodeError) as exc:
            # A secret that cannot be used is a configuration error.
            return f"cannot sign: {exc}"
        return None

    def update(self, target: Target) -> bool:
        self.target = target
        return False  # the shared client keeps its pool

    async def send(self, event: Event, trace: dict[str, str] | None = None) -> AttemptResult:
        target = self.target
        body, extra = build_body(target, event)
        headers = sign_headers(self.signer(), event.id, body, extra)
        if trace:
            headers.update(trace)
        assert target.url is not None
        return await self.http.post(target.url, body, headers, target.timeout_s)

    async def send_batch(
        self, events: Sequence[Event], traces: Sequence[dict[str, str] | None] | None = None
    ) -> list[AttemptResult]:
        """Bodies and signatures for all, then the POSTs concurrently over the pool's
        keep-alive connections (``HttpSender.post_many``)."""
        target = self.target
        assert target.url is not None
        signer = self.signer()
        requests: list[tuple[bytes, dict[str, str]]] = []
        for i, event in enumerate(events):
            body, extra = build_body(target, event)
            headers = sign_headers(signer, event.id, body, extra)
            trace = traces[i] if traces else None
            if trace:
                headers.update(trace)
            requests.append((body, headers))
        return await self.http.post_many(target.url, requests, target.timeout_s)

    async def _open(self) -> None:
        pass  # the egress's HTTP client is shared and pooled

    async def _shut(self) -> None:
        pass

    async def _send(self, event: Event) -> None:  # pragma: no cover - send is overridden
        raise NotImplementedError
