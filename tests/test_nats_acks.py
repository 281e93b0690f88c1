"""``delivery_of`` (mesh/_nats/acks.py) reads a reply subject as nats.py's metadata does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from mesh._nats.acks import delivery_of

NUM = st.integers(min_value=0, max_value=2**63).map(str)
NAME = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


def msg(reply: str) -> Msg:
    return Msg(_client=None, subject="x", reply=reply, data=b"", headers=None)  # type: ignore[arg-type]


def nats_reading(m: Msg) -> tuple[int, int | None]:
    meta = m.metadata
    return int(meta.num_delivered or 1), meta.sequence.stream if meta.sequence else None


@given(NAME, NAME, NUM, NUM, NUM, NUM, NUM)
def test_v1(stream: str, consumer: str, dl: str, sseq: str, cseq: str, ts: str, pend: str) -> None:
    m = msg(f"$JS.ACK.{stream}.{consumer}.{dl}.{sseq}.{cseq}.{ts}.{pend}")
    assert delivery_of(m) == nats_reading(msg(m.reply))


@given(NAME, NAME, NAME, NUM, NUM, NUM, NUM, NUM, st.lists(NAME, max_size=2))
def test_v2(
    stream: str,
    consumer: str,
    acc: str,
    dl: str,
    sseq: str,
    cseq: str,
    ts: str,
    pend: str,
    tail: list[str],
) -> None:
    tokens = ["$JS", "ACK", "_", acc, stream, consumer, dl, sseq, cseq, ts, pend, *tail]
    m = msg(".".join(tokens))
    assert delivery_of(m) == nats_reading(msg(m.reply))


@pytest.mark.parametrize(
    "reply",
    ["", "_INBOX.x", "$JS.ACK.s.c.1.2.3", "$JS.ACK.s.c.x.2.3.4.5", "$JS.NAK.s.c.1.2.3.4.5"],
)
def test_not_a_delivery_raises_as_nats_py(reply: str) -> None:
    with pytest.raises((NatsError, ValueError)) as ours:
        delivery_of(msg(reply))
    with pytest.raises((NatsError, ValueError)) as theirs:
        nats_reading(msg(reply))
    assert type(ours.value) is type(theirs.value)
