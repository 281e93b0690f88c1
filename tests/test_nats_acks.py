"""mesh/_nats/acks.py: ``delivery_of`` reads a reply subject as nats.py's metadata does;
``ack_many`` acks as ``msg.ack()`` does (real nats-server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MsgAlreadyAckdError
from nats.js.api import AckPolicy, ConsumerConfig

from mesh._nats import headers
from mesh._nats.acks import ack_many, delivery_of
from mesh._nats.pullfeed import PullFeed
from mesh.client import MeshClient
from tests.support import eventually

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


@pytest.mark.parametrize("fast", [True, False], ids=["checked-nats-py", "other-nats-py"])
async def test_ack_many_acks_a_batch_once(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """On a nats.py release the fast paths were not checked against, the feed takes a
    callback subscription and each ack goes through ``Msg.ack``: the same answers."""
    if fast and not headers.FAST_PATHS:
        pytest.skip(f"nats.py {headers.NATS_PY_VERSION} is not one the fast paths were read for")
    monkeypatch.setattr(headers, "FAST_PATHS", fast)
    await client.js.add_consumer(
        client.names.events,
        ConsumerConfig(durable_name="acks", ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
    )
    await client.publish_many([client.build("shop", "order.created", {"i": i}) for i in range(5)])
    feed = await PullFeed(client.nc, client.names.events, "acks").open()
    try:
        assert feed._sub is not None
        assert (feed._sub._id in client.nc._direct) is fast  # type: ignore[attr-defined]
        msgs = await feed.fetch(5, timeout=2)
        assert len(msgs) == 5
        assert await ack_many(msgs) == []
        await client.nc.flush()

        async def settled() -> bool:
            # The server takes acks on its own queue: consumer info read straight after
            # the flush can still count them pending (seen once in CI).
            info = await client.js.consumer_info(client.names.events, "acks")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(settled, 5, "the five acks taken")
        again = await ack_many(msgs)  # as msg.ack(): acked already
        assert [m for m, _ in again] == msgs
        assert all(isinstance(e, MsgAlreadyAckdError) for _, e in again)
    finally:
        await feed.close()
