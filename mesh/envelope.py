"""CloudEvents over NATS, binary content mode.

Attributes travel as ``ce-*`` headers and the data is the body (msgpack by
default for Python values, JSON or raw bytes on request). An encrypted body is a
Fernet token with header ``mesh-encryption: fernet``.

A plain message with no ``ce-*`` headers (what ``nats pub`` sends) is a valid
event too: source and type come from the subject, the id from ``Nats-Msg-Id``
or the stream sequence, and the body is JSON when it parses, bytes otherwise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import msgpack

from mesh.crypto import KeyRing
from mesh.errors import DecodeError, ValidationError
from mesh.subjects import DEFAULT_TENANT, Subjects, split_source

SPECVERSION = "1.0"
MSGPACK = "application/msgpack"
JSON = "application/json"
OCTETS = "application/octet-stream"
TEXT = "text/plain"

H_ENCRYPTION = "mesh-encryption"
H_MSG_ID = "Nats-Msg-Id"
EXT_ORIGIN = "meshorigin"
EXT_HOPS = "meshhops"
EXT_REPLAY = "meshreplay"
# CloudEvents extension naming a tenant's event's tenant on the way out (``outward``).
EXT_TENANT = "tenant"

# The header vocabulary: every ``ce-*`` name the mesh reads or writes is spelled here
# (built once: hot path). ``mesh.delivery.MessageHeaders`` reads a message's.
CE_PREFIX = "ce-"
H_SPECVERSION = "ce-specversion"
H_ID = "ce-id"
H_SOURCE = "ce-source"
H_TYPE = "ce-type"
H_TIME = "ce-time"
H_DATACONTENTTYPE = "ce-datacontenttype"
H_SUBJECT = "ce-subject"
H_TRACEPARENT = "ce-traceparent"
H_TRACESTATE = "ce-tracestate"
H_ORIGIN = f"{CE_PREFIX}{EXT_ORIGIN}"
H_HOPS = f"{CE_PREFIX}{EXT_HOPS}"
H_REPLAY = f"{CE_PREFIX}{EXT_REPLAY}"

_CORE_ATTRS = ("id", "source", "type", "specversion", "time", "datacontenttype", "subject")
# The ``ce-*`` headers that are not extensions (decode's one set lookup per header).
_NOT_EXTENSIONS = frozenset(
    CE_PREFIX + name for name in (*_CORE_ATTRS, EXT_ORIGIN, EXT_HOPS, EXT_REPLAY)
)
_PREFIX_LEN = len(CE_PREFIX)
# Headers a mesh event carries that are never extensions: when a message has no other,
# decode skips looking for extensions header by header.
_PLAIN_HEADERS = _NOT_EXTENSIONS | {H_MSG_ID, H_ENCRYPTION}


def new_event_id() -> str:
    return uuid.uuid4().hex


def event_id_of(
    headers: Mapping[str, str], seq: int | None = None, fallback: str | None = None
) -> str:
    """The id of the event a message carries: its ``ce-id``; for a plain message its
    ``Nats-Msg-Id``, else ``seq-<stream sequence>``, else ``fallback``, else a new id.

    The one derivation: decode, replay, the egress's records, the sink's rows and the
    DLQ tools all ask this.
    """
    found = headers.get(H_ID) or headers.get(H_MSG_ID)
    if found:
        return found
    if seq is not None:
        return f"seq-{seq}"
    return fallback or new_event_id()


@dataclass
class Event:
    """One CloudEvent, decoded."""

    source: str
    type: str
    data: Any = None
    id: str = field(default_factory=new_event_id)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    datacontenttype: str = MSGPACK
    subject: str | None = None
    origin: str | None = None
    hops: int = 0
    replay: bool = False
    extensions: dict[str, str] = field(default_factory=dict)
    # Where it was read from (not part of the event).
    seq: int | None = None
    nats_subject: str | None = None

    @property
    def effective_origin(self) -> str:
        return self.origin or self.source

    def json_data(self) -> Any:
        """The data as a JSON-compatible value (bytes become a latin-1-free base64 string)."""
        return to_jsonable(self.data)


def outward(event: Event) -> Event:
    """The event as a destination sees it: a tenant's qualified source ``~T.<source>`` is
    the plain ``<source>`` (its origin too), the tenant in the ``tenant`` extension. Inside
    the mesh the qualified form keeps tenants apart; a receiver needs neither the marker
    nor to parse it. A default-tenant event is returned as it is (no copy)."""
    tenant, source = split_source(event.source)
    if tenant == DEFAULT_TENANT:
        return event
    origin = None if event.origin is None else split_source(event.origin)[1]
    return replace(
        event, source=source, origin=origin, extensions={**event.extensions, EXT_TENANT: tenant}
    )


def to_jsonable(value: Any) -> Any:
    import base64

    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def encode_data(data: Any, datacontenttype: str | None) -> tuple[bytes, str]:
    """Serialise data; returns ``(body, datacontenttype)``."""
    if isinstance(data, bytes | bytearray | memoryview):
        # Raw bytes travel as they are. Event's default type (msgpack) would mislabel
        # them and the receiver would try to unpack them: bytes are octets unless told
        # otherwise.
        if datacontenttype is None or datacontenttype == MSGPACK:
            datacontenttype = OCTETS
        return bytes(data), datacontenttype
    if datacontenttype is None:
        datacontenttype = MSGPACK
    try:
        if datacontenttype == MSGPACK:
            return msgpack.packb(data, use_bin_type=True, datetime=False), MSGPACK
        if datacontenttype == JSON or datacontenttype.endswith("+json"):
            return json.dumps(data, separators=(",", ":")).encode(), datacontenttype
        if datacontenttype.startswith("text/") and isinstance(data, str):
            return data.encode(), datacontenttype
    except (TypeError, ValueError, OverflowError) as exc:
        # OverflowError: an integer outside msgpack's 64 bits (JSON input has no limit).
        raise ValidationError(f"data cannot be encoded as {datacontenttype}: {exc}") from None
    raise ValidationError(f"cannot encode {type(data).__name__} as {datacontenttype}")


def decode_data(body: bytes, datacontenttype: str) -> Any:
    if not body:
        # Empty bytes and empty text are data too; msgpack and JSON never encode to nothing.
        if datacontenttype in (MSGPACK, JSON) or datacontenttype.endswith("+json"):
            return None
        return "" if datacontenttype.startswith("text/") else b""
    try:
        if datacontenttype == MSGPACK:
            return msgpack.unpackb(body, raw=False, strict_map_key=False, timestamp=0)
        if datacontenttype == JSON or datacontenttype.endswith("+json"):
            return json.loads(body)
        if datacontenttype.startswith("text/"):
            return body.decode()
    except (ValueError, UnicodeDecodeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise DecodeError(f"body is not valid {datacontenttype}: {type(exc).__name__}") from None
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise DecodeError(f"body is not valid {datacontenttype}: {type(exc).__name__}") from None
    return body


def encode(
    event: Event, keyring: KeyRing | None = None, encrypt: bool = True
) -> tuple[dict[str, str], bytes]:
    """Event -> (headers, body) for a NATS message."""
    body, ctype = encode_data(event.data, event.datacontenttype)  # the event stays as it is
    headers = {
        H_MSG_ID: event.id,
        H_SPECVERSION: SPECVERSION,
        H_ID: event.id,
        H_SOURCE: event.source,
        H_TYPE: event.type,
        H_TIME: event.time.isoformat(),
        H_DATACONTENTTYPE: ctype,
        H_ORIGIN: event.origin or event.source,
        H_HOPS: str(event.hops),
    }
    if event.subject:
        headers[H_SUBJECT] = event.subject
    if event.replay:
        headers[H_REPLAY] = "true"
    for name, value in event.extensions.items():
        headers[CE_PREFIX + name] = value
    if encrypt and keyring is not None:
        body = keyring.encrypt(body)
        headers[H_ENCRYPTION] = "fernet"
    return headers, body


def open_body(headers: Mapping[str, str] | None, body: bytes, keyring: KeyRing | None) -> bytes:
    """The plaintext body (decrypting when the message says it is encrypted)."""
    enc = (headers or {}).get(H_ENCRYPTION)
    if not enc:
        return body
    if enc != "fernet":
        raise DecodeError(f"unknown encryption {enc!r}")
    if keyring is None:
        raise DecodeError("payload is encrypted and no key ring is loaded")
    return keyring.decrypt(body)


def _parse_time(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DecodeError(f"ce-time is not an RFC 3339 time: {value[:40]!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def decode(
    nats_subject: str,
    headers: Mapping[str, str] | None,
    body: bytes,
    keyring: KeyRing | None,
    *,
    seq: int | None = None,
    subjects: Subjects | None = None,
    decode_body: bool = True,
) -> Event:
    """A NATS message on an evt/replay subject -> Event. Raises DecodeError."""
    subjects = subjects or Subjects()
    headers = headers or {}
    try:
        source, etype, _replay_target = subjects.parse_event(nats_subject)
    except ValidationError as exc:
        raise DecodeError(str(exc)) from None
    plaintext = open_body(headers, body, keyring)
    if H_ID not in headers:
        # A plain message from any NATS client.
        msg_id = event_id_of(headers, seq)
        data: Any
        ctype: str
        try:
            data = json.loads(plaintext) if plaintext else None
            ctype = JSON
        except (ValueError, UnicodeDecodeError):
            data, ctype = plaintext, OCTETS
        return Event(
            source=source,
            type=etype,
            data=data,
            id=msg_id,
            datacontenttype=ctype,
            seq=seq,
            nats_subject=nats_subject,
        )
    if headers.get(H_SPECVERSION) != SPECVERSION:
        raise DecodeError(f"unsupported ce-specversion {headers.get(H_SPECVERSION)!r}")
    if headers.get(H_SOURCE) != source:
        raise DecodeError("ce-source header does not match the subject's source")
    if headers.get(H_TYPE) != etype:
        raise DecodeError("ce-type header does not match the subject's type")
    try:
        hops = int(headers.get(H_HOPS, "0"))
    except ValueError:
        raise DecodeError("ce-meshhops is not an integer") from None
    if hops < 0:
        raise DecodeError("ce-meshhops is negative")
    ctype = headers.get(H_DATACONTENTTYPE) or OCTETS
    extensions = (
        {}
        if headers.keys() <= _PLAIN_HEADERS
        else {
            k[_PREFIX_LEN:]: v
            for k, v in headers.items()
            if k.startswith(CE_PREFIX) and k not in _NOT_EXTENSIONS
        }
    )
    return Event(
        source=source,
        type=etype,
        data=decode_data(plaintext, ctype) if decode_body else plaintext,
        id=headers[H_ID],
        time=_parse_time(headers[H_TIME]) if H_TIME in headers else datetime.now(UTC),
        datacontenttype=ctype,
        subject=headers.get(H_SUBJECT),
        origin=headers.get(H_ORIGIN) or source,
        hops=hops,
        replay=headers.get(H_REPLAY) == "true"
        or nats_subject.startswith(f"{subjects.prefix}.replay."),
        extensions=extensions,
        seq=seq,
        nats_subject=nats_subject,
    )
