"""nats.py's client with a cheaper header parser (same answers, a fraction of the CPU),
and subscriptions without a queue and a task per message (``MeshNats.subscribe_direct``).

nats.py 2.16 parses every message's header block in ``Client._parse_header_lines`` and
drops a name with whitespace inside by testing it character by character in a
generator (``any(c.isspace() for c in key)``): with the ten or so headers of a mesh
event (``ce-*``, ``Nats-Msg-Id``, ``mesh-encryption``) that was the largest single item
of the egress's fetch path, about 10 us per message. ``MeshNats`` answers the same
question with one ``str.split`` per name (``str.split()`` and ``str.isspace`` agree on
what whitespace is), and only for a name that may hold whitespace at all (a space, or a
character ``str.isprintable`` refuses: every other whitespace is a control character).
A block that is all ASCII (a mesh event's always is) is decoded once and split as text
rather than line by line as bytes: 6.5 -> 2.9 us for a mesh event's ten headers.
Everything else is nats.py's own code, unchanged. ``tests/test_nats_headers.py`` checks
that both parsers agree on any header block.
"""

from __future__ import annotations

from collections.abc import Callable

import nats.errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.client import __version__ as NATS_PY_VERSION
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_CRLF = b"\r\n"
# What ``bytes.strip()`` strips (ASCII whitespace); ``str.strip()`` would also strip
# \x1c-\x1f, which nats.py's ``bytes.strip`` keeps.
_BYTES_WS = " \t\n\r\x0b\x0c"


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """``nats.aio.client.Client._parse_header_lines``, answer for answer."""
    if raw.isascii():
        return _parse_ascii(raw.decode("ascii"))
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:  # also the empty line
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue  # a name with non-ASCII bytes: skipped, as nats.py does
        # A name with whitespace anywhere (``bytes.strip`` leaves \x1c-\x1f at the ends,
        # which ``str.isspace`` counts) is skipped; "" is kept, as nats.py keeps it.
        if key and key.split() != [key]:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def _parse_ascii(text: str) -> dict[str, str]:
    """``parse_header_lines`` of an all-ASCII block, as text: each name and value is
    what decoding its bytes gives (ASCII decodes the same as ascii or utf-8)."""
    out: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip(_BYTES_WS)
        # Whitespace in ASCII is a space or a control character (never printable).
        if (" " in key or not key.isprintable()) and key and key.split() != [key]:
            continue
        out[key] = value.strip(_BYTES_WS)
    return out


# The nats.py releases whose private parts the fast paths below use (``_process_msg``,
# ``_build_message``, ``_process_headers``, ``_send_command``, ``_flush_pending``,
# ``Msg._check_reply``/``_ackd``) were read and tested against; with any other release
# the mesh takes nats.py's public paths (a callback subscription, ``Msg.ack`` each).
CHECKED_NATS_PY = {(2, 16)}


def _release(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return ()


FAST_PATHS = _release(NATS_PY_VERSION) in CHECKED_NATS_PY


class MeshNats(NATS):
    """The nats.py client the mesh connects with (``JetStreamPort``).

    Besides the header parser, it has direct subscriptions (``subscribe_direct``): a
    plain function gets each message as the read loop parses it. nats.py hands every
    message of a subscription with a callback through an ``asyncio.Queue`` to a task of
    its own, which then awaits the callback: a queue put and get, a coroutine and a task
    wake-up per message, for ``PullFeed``'s callback that only appends the message to a
    deque. The path here skips nothing else: the same header parsing and ``Msg``."""

    _parse_header_lines = staticmethod(parse_header_lines)

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Callable[[Msg], None]] = {}

    async def subscribe_direct(self, subject: str, handler: Callable[[Msg], None]) -> Subscription:
        """A core subscription whose messages go to ``handler`` in the read loop, in order.
        ``handler`` must not block (it runs between the parser's messages); what it raises
        goes to the connection's error callback, as a callback's error does in nats.py."""
        if not FAST_PATHS:

            async def callback(msg: Msg) -> None:
                handler(msg)

            return await self.subscribe(subject, cb=callback)
        sub = await self.subscribe(subject)  # no callback: nats.py starts no task for it
        self._direct[sub._id] = handler
        return sub

    async def publish_empty(self, subjects: list[str]) -> None:
        """``publish(subject)`` (no payload, no reply, no headers) for each of
        ``subjects``, handed to the connection as one command: JetStream acks. The
        subjects are reply subjects the server sent (its protocol cannot carry a space
        or a line break in one), so nats.py's subject check is left out. While the
        connection is not up, each goes through ``publish``, which buffers or raises."""
        if not subjects:
            return
        if self.is_closed:
            raise nats_errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats_errors.ConnectionDrainingError
        if not self.is_connected or not FAST_PATHS:
            for subject in subjects:
                await self.publish(subject)
            return
        # nats.py's frame for each (``protocol.command.pub_cmd(subject, "", b"")``).
        await self._send_command("".join([f"PUB {s}  0\r\n\r\n" for s in subjects]).encode())
        self.stats["out_msgs"] += len(subjects)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._direct.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        # nats.py's own steps for a core subscription without a callback, up to handing
        # the message over (no max_msgs, no JetStream push state: neither is set here).
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub = self._subs.get(sid)
        if sub is None:
            return
        sub._received += 1
        hdr = await self._process_headers(headers)
        msg = self._build_message(sid, subject, reply, data, hdr)
        if not msg:
            return
        try:
            handler(msg)
        except Exception as exc:
            await self._error_cb(exc)
