"""Request/reply on the wire: ``Reply`` (status, data, headers), how a request is
decoded and how a reply is written and read back. ``MeshClient.request``, ``reply`` and
``serve_requests`` use them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from mesh import envelope, rpc_spans, tracing
from mesh._nats.types import Msg, nats_errors
from mesh.crypto import KeyRing
from mesh.envelope import Event
from mesh.errors import DecodeError, RequestError, RequestTimeout, ValidationError
from mesh.subjects import TENANT_MARK, Subjects, validate_source

log = structlog.get_logger("mesh.client")  # the client's logger, as before the split

H_STATUS = "mesh-status"


@dataclass
class Reply:
    """The answer to a request: an HTTP-like status and data."""

    status: int
    data: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def read_reply(msg: Msg, keyring: KeyRing | None) -> Reply:
    """The ``Reply`` in a reply message (opened with ``keyring`` when sealed)."""
    headers = dict(msg.headers or {})
    try:
        status = int(headers.get(H_STATUS, "200"))
    except ValueError:
        status = 502
    body = envelope.open_body(headers, msg.data, keyring)
    ctype = headers.get(envelope.H_DATACONTENTTYPE, envelope.JSON if body[:1] in b"{[" else "")
    data: Any = envelope.decode_data(body, ctype) if ctype else body
    return Reply(status=status, data=data, headers=headers)


async def send_request(
    port: Any, subject: str, headers: dict[str, str], body: bytes, target: str, timeout: float
) -> Msg:
    """One request over core NATS (``port``: a ``JetStreamPort``); raises ``RequestError`` /
    ``RequestTimeout``."""
    try:
        msg: Msg = await port.request(subject, body, timeout=timeout, headers=headers)
    except nats_errors.NoRespondersError:
        raise RequestError(f"no responder for target {target!r}") from None
    except (nats_errors.TimeoutError, TimeoutError):
        raise RequestTimeout(f"request to {target!r} timed out after {timeout}s") from None
    return msg


def decode_request(msg: Msg, subjects: Subjects, keyring: KeyRing | None) -> Event:
    """The event in a request message; raises ``DecodeError``."""
    headers = msg.headers or {}
    source = headers.get(envelope.H_SOURCE, "")
    try:
        validate_source(source)  # a tenant's asker: ~tenant.source
    except ValidationError:
        # Requests need to say who asks: a reply goes to a known source.
        raise DecodeError(f"a request needs a valid ce-source header, not {source!r}") from None
    parts = msg.subject.split(".")
    at = len(subjects.prefix.split(".")) + 1  # the target: a name, or a tenant's ~T.name
    event_type = ".".join(parts[at + (2 if parts[at].startswith(TENANT_MARK) else 1) :])
    return envelope.decode(
        subjects.evt(source, event_type), headers, msg.data, keyring, subjects=subjects
    )


def reply_message(
    data: Any,
    status: int,
    source: str,
    keyring: KeyRing | None,
    encryption: bool,
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a reply (sealed with ``keyring`` when ``encryption``), with the
    W3C context of the active span, the one that answered (``ce-traceparent``), if any."""
    event = Event(source=source or "mesh", type="reply", data=data)
    event.extensions.update(rpc_spans.reply_context())
    if isinstance(data, bytes | bytearray):
        event.datacontenttype = envelope.OCTETS
    headers, body = envelope.encode(event, keyring, encryption)
    headers[H_STATUS] = str(status)
    return headers, body


async def answer_request(
    msg: Msg,
    target: str,
    handler: Callable[[Event], Awaitable[Any]],
    decode: Callable[[Msg], Event],
    reply: Callable[[Msg, Any, int, str], Awaitable[None]],
) -> None:
    """Answer one request to ``target`` with what ``handler`` returns (a ``Reply`` sets
    the status); a bad request is a 400, a failing handler a 500."""
    try:
        event = decode(msg)
    except DecodeError as exc:
        await reply(msg, {"error": str(exc)}, 400, target)
        return
    if event.source == target:
        await reply(msg, {"error": "a target cannot request itself"}, 400, target)
        return
    span = rpc_spans.start_serve(event, msg.subject, target)  # None when off
    status = 500
    try:
        with tracing.current(span):  # the handler's spans and log lines, and the reply
            try:
                result = await handler(event)
            except Exception as exc:
                log.warning("request handler failed", target=target, error=type(exc).__name__)
                await reply(msg, {"error": type(exc).__name__}, 500, target)
                return
            if not isinstance(result, Reply):
                result = Reply(200, result)
            status = result.status
            await reply(msg, result.data, result.status, target)
    finally:
        rpc_spans.end_serve(span, status)
