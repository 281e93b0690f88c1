"""Request/reply for webhook targets: ``<prefix>.rpc.<target>.>`` answered by a signed
synchronous POST; the reply carries the HTTP status and the answer's body.

One queue-group subscription per target (``rpc-<target>``), so several egress instances
share the requests. Each request runs in its own task (bounded by the target's
``max_in_flight``): a slow receiver does not hold up the next request. The target's rate
limit and the egress-wide in-flight limit apply; while its circuit is not closed a
request is answered 503 without calling the receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any, Protocol

from mesh import rpc_spans, tracing
from mesh._nats.types import Msg, Subscription
from mesh.envelope import Event, outward
from mesh.errors import DecodeError
from mesh.replies import Reply
from mesh.resilience import CircuitState
from services.egress.http.sender import AttemptResult, build_body, sign_headers
from services.egress.spans import end_attempt

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from mesh.registry import Target
    from mesh.resilience import RateLimiter
    from mesh.signing import Signer
    from services.egress.circuit import SharedCircuit
    from services.egress.shared import EgressShared


class Deliverer(Protocol):
    """What a responder reads of its target's worker (``TargetWorker``), live: the
    target, its circuit and its rate limiter change while the responder runs."""

    name: str
    client: MeshClient
    target: Target
    circuit: SharedCircuit
    limiter: RateLimiter | None
    log: Any
    egress: EgressShared

    def signer(self) -> Signer: ...


class RequestResponder:
    """Answers one webhook target's requests."""

    def __init__(self, worker: Deliverer) -> None:
        self.worker = worker
        self.client = worker.client
        self.name = worker.name
        self.tasks: set[asyncio.Task[None]] = set()
        self.sub: Subscription | None = None
        self.stopping = False

    async def start(self) -> None:
        if self.sub is not None:
            return
        self.sub = await self.client.port.subscribe(
            self.client.subjects.rpc_filter(self.name), queue=f"rpc-{self.name}", cb=self._on_rpc
        )

    async def stop(self) -> None:
        """Take no new requests (the ones being answered finish or are cancelled later)."""
        self.stopping = True
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    async def _on_rpc(self, msg: Msg) -> None:
        if self.stopping:
            await self.client.reply(msg, {"error": "egress stopping"}, 503, self.name)
            return
        if len(self.tasks) >= self.worker.target.max_in_flight:
            await self.client.reply(msg, {"error": "target busy"}, 503, self.name)
            return
        task = asyncio.create_task(self._answer(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        """A synchronous signed POST; the reply carries its status and body."""
        try:
            try:
                event = self.client.decode_request(msg)
            except DecodeError as exc:
                await self.client.reply(msg, {"error": str(exc)}, 400, self.name)
                return
            if event.source == self.name:
                await self.client.reply(msg, {"error": "a target cannot request itself"}, 400)
                return
            if self.worker.circuit.state is not CircuitState.CLOSED:
                await self.client.reply(
                    msg, {"error": f"circuit {self.worker.circuit.state.value}"}, 503, self.name
                )
                return
            span = rpc_spans.start_serve(event, msg.subject, self.name)  # None when off
            status = 500
            try:
                with tracing.current(span):  # the POST's span and the reply under it
                    status = await self._post(msg, event)
            finally:
                rpc_spans.end_serve(span, status)
        except Exception as exc:
            self.worker.log.warning("request to the target failed", error=repr(exc))
            with contextlib.suppress(Exception):
                await self.client.reply(msg, {"error": type(exc).__name__}, 500, self.name)

    async def _post(self, msg: Msg, event: Event) -> int:
        """The signed POST and the reply; returns the reply's status."""
        target = self.worker.target
        body, extra = build_body(target, outward(event))  # plain source, tenant apart
        if self.worker.limiter is not None:
            await self.worker.limiter.acquire()
        async with self.worker.egress.slots:
            if self.worker.circuit.state is not CircuitState.CLOSED:
                reply = Reply(503, {"error": f"circuit {self.worker.circuit.state.value}"})
                await self.client.reply(msg, reply.data, reply.status, self.name)
                return reply.status
            headers = sign_headers(self.worker.signer(), event.id, body, extra)
            assert target.url is not None
            span = None
            if tracing.TRACER is not None and tracing.wanted(event):
                # A client span under the server span (the active one), its context sent.
                name, attrs = tracing.http_attributes(target.url, "POST", 1)
                attrs.update(tracing.event_attributes(event), **{"mesh.target": self.name})
                span = tracing.start_span(name, kind="CLIENT", attributes=attrs)
                headers.update(tracing.traceparent_of(span))
            elif tracing.EXT_TRACEPARENT in event.extensions:
                headers.update(tracing.w3c_headers(event))  # untraced: the event's own context
            try:
                result = await self.worker.egress.http.post(
                    target.url, body, headers, target.timeout_s, keep_body=True
                )
            except BaseException as exc:
                if span is not None:
                    tracing.end_span(span, type(exc).__name__)
                raise
            if span is not None:
                end_attempt(span, result)
        reply = reply_for(result)
        await self.client.reply(msg, reply.data, reply.status, self.name)
        return reply.status


def reply_for(result: AttemptResult) -> Reply:
    if result.refused:
        return Reply(403, {"error": result.error})
    if result.status is None:
        status = 504 if (result.error or "").startswith("timeout") else 502
        return Reply(status, {"error": result.error})
    ctype = result.content_type.split(";")[0].strip().lower()
    data: Any = result.body
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            data = json.loads(result.body) if result.body else None
        except ValueError:
            data = result.body.decode("utf-8", "replace")
    elif ctype.startswith("text/"):
        data = result.body.decode("utf-8", "replace")
    return Reply(result.status, data)
