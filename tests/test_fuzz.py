"""Hypothesis fuzzing: the envelope decoder and CLI data parsing never crash on bad input.

Every outcome is either a decoded event or a DecodeError/ValidationError (a
clear error), never another exception. The integration test at the end sends
garbage on the event subjects and checks that it is dead-lettered while good
events keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import string
from datetime import UTC, datetime

from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import envelope
from mesh.cli._common import parse_data, parse_duration, parse_time
from mesh.client import MeshClient
from mesh.crypto import Key, KeyRing
from mesh.envelope import Event
from mesh.errors import DecodeError, ValidationError
from mesh.records import parse_dead_letter
from mesh.registry import Target, TargetKind
from mesh.subjects import Subjects

RING = KeyRing([Key(id="k1", created=datetime.now(UTC), secret=Fernet.generate_key().decode())])

header_names = st.sampled_from(
    [
        "ce-id",
        "ce-source",
        "ce-type",
        "ce-specversion",
        "ce-time",
        "ce-datacontenttype",
        "ce-meshhops",
        "ce-meshorigin",
        "ce-meshreplay",
        "mesh-encryption",
        "Nats-Msg-Id",
        "x-other",
    ]
)
header_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "1.0",
            "shop",
            "order.created",
            "fernet",
            "application/msgpack",
            "application/json",
            "-1",
            "99",
            "2026-01-01T00:00:00Z",
            "notatime",
        ]
    ),
)
subjects = st.one_of(
    st.just("mesh.evt.shop.order.created"),
    st.just("mesh.replay.billing.shop.order.created"),
    st.text(alphabet=string.ascii_lowercase + ".*>", min_size=0, max_size=30),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=subjects,
    headers=st.one_of(st.none(), st.dictionaries(header_names, header_values, max_size=9)),
    body=st.binary(max_size=300),
)
def test_decoder_never_crashes(subject: str, headers: dict[str, str] | None, body: bytes) -> None:
    try:
        event = envelope.decode(subject, headers, body, RING, seq=7)
    except DecodeError:
        return
    assert isinstance(event, Event)
    assert event.id
    assert event.hops >= 0


@settings(max_examples=200, deadline=None)
@given(
    data=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=20)
        | st.floats(allow_nan=False),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_round_trip_any_json_value(data: object) -> None:
    """Whatever a user can publish comes back equal, encrypted or not, msgpack or JSON."""
    for ctype in (envelope.MSGPACK, envelope.JSON):
        ev = Event(source="shop", type="t.x", data=data, datacontenttype=ctype)
        for ring in (RING, None):
            headers, body = envelope.encode(ev, ring, encrypt=ring is not None)
            back = envelope.decode("mesh.evt.shop.t.x", headers, body, ring)
            assert back.data == data
            assert back.id == ev.id


@settings(max_examples=200, deadline=None)
@given(raw=st.text(max_size=60))
def test_cli_data_parsing_is_json_or_one_clear_error(raw: str) -> None:
    if raw.startswith("@") or raw == "-":
        return  # files and stdin: covered by the CLI tests
    try:
        parse_data(raw)
    except ValidationError as exc:
        assert str(exc).startswith("malformed JSON in --data")
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(raw=st.text(max_size=30))
def test_time_and_duration_parsing_never_crash(raw: str) -> None:
    for fn in (parse_time, parse_duration):
        try:
            fn(raw)
        except ValidationError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=100, deadline=None)
@given(
    headers=st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=6),
    body=st.binary(max_size=50),
)
def test_dead_letter_parser_never_crashes(headers: dict[str, str], body: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_dead_letter(headers, body)


async def test_garbage_on_event_subjects_is_dead_lettered(client: MeshClient) -> None:
    await client.add_target(Target(name="billing", kind=TargetKind.NATS))
    await client.add_propagation("unidirectional", "shop", ["billing"])
    subj = Subjects()
    garbage = [
        (
            b"\x00\xff\xfe garbage",
            {
                "ce-id": "g1",
                "ce-specversion": "1.0",
                "ce-source": "shop",
                "ce-type": "order.created",
                "ce-datacontenttype": "application/msgpack",
            },
        ),
        (
            b"not a fernet token",
            {
                "ce-id": "g2",
                "ce-specversion": "1.0",
                "ce-source": "shop",
                "ce-type": "order.created",
                "mesh-encryption": "fernet",
            },
        ),
        (
            b"{}",
            {
                "ce-id": "g3",
                "ce-specversion": "0.3",
                "ce-source": "shop",
                "ce-type": "order.created",
            },
        ),
        (
            b"{}",
            {
                "ce-id": "g4",
                "ce-specversion": "1.0",
                "ce-source": "forged",
                "ce-type": "order.created",
            },
        ),
        (
            b"{}",
            {
                "ce-id": "g5",
                "ce-specversion": "1.0",
                "ce-source": "shop",
                "ce-type": "order.created",
                "ce-meshhops": "many",
            },
        ),
    ]
    for body, headers in garbage:
        await client.js.publish(subj.evt("shop", "order.created"), body, headers=headers)
    good = await client.publish("shop", "order.created", {"ok": True})

    received = []

    async def drain() -> None:
        async for d in client.consume("billing"):
            received.append(d.event.id)
            await d.ack()
            if d.event.id == good:
                return

    await asyncio.wait_for(drain(), 20)
    assert received == [good]  # garbage never reaches a consumer

    info = await client.js.stream_info(client.names.dlq)
    assert info.state.messages == len(garbage)
    sub = await client.js.pull_subscribe(subj.dlq("billing"), durable=None, stream=client.names.dlq)
    msgs = await sub.fetch(len(garbage), timeout=5)
    letters = [parse_dead_letter(m.headers, m.data) for m in msgs]
    assert sorted(dl.event_id for dl in letters) == ["g1", "g2", "g3", "g4", "g5"]
    assert all(dl.error.startswith("undecodable") for dl in letters)
