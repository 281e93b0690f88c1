"""CloudEvents over NATS headers: encode/decode round trips, plain messages, forgeries."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import envelope
from mesh.crypto import KeyRing
from mesh.envelope import JSON, MSGPACK, OCTETS, Event, decode, encode
from mesh.errors import DecodeError, ValidationError
from mesh.subjects import Subjects


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.load(tmp_path / "keys" / "k.json")


def roundtrip(event: Event, ring: KeyRing | None, encrypt: bool = True) -> Event:
    headers, body = encode(event, ring, encrypt)
    subject = Subjects().evt(event.source, event.type)
    return decode(subject, headers, body, ring, seq=3)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(json_values)
def test_msgpack_roundtrip(value: Any) -> None:
    e = Event(source="shop", type="order.created", data=value)
    back = roundtrip(e, None, encrypt=False)
    assert back.data == value
    assert back.datacontenttype == MSGPACK


@settings(max_examples=60, deadline=None)
@given(json_values)
def test_json_roundtrip(value: Any) -> None:
    e = Event(source="shop", type="order.created", data=value, datacontenttype=JSON)
    back = roundtrip(e, None, encrypt=False)
    assert back.data == value
    assert back.datacontenttype == JSON


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_bytes_roundtrip(value: bytes) -> None:
    e = Event(source="shop", type="blob", data=value)
    back = roundtrip(e, None, encrypt=False)
    assert back.data == value
    assert back.datacontenttype == OCTETS


def test_text_roundtrip() -> None:
    e = Event(source="shop", type="note", data="héllo", datacontenttype="text/plain")
    assert roundtrip(e, None, encrypt=False).data == "héllo"


def test_all_attributes_survive(ring: KeyRing) -> None:
    t = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    e = Event(
        source="shop",
        type="order.created",
        data={"n": 1},
        id="evt-1",
        time=t,
        subject="order/7",
        origin="crm",
        hops=2,
        extensions={"traceparent": "00-abc-def-01"},
    )
    headers, _ = encode(e, ring)
    assert headers["ce-id"] == headers["Nats-Msg-Id"] == "evt-1"
    assert headers["ce-specversion"] == "1.0"
    assert headers["mesh-encryption"] == "fernet"
    back = roundtrip(e, ring)
    assert (back.id, back.source, back.type, back.time, back.subject) == (
        "evt-1",
        "shop",
        "order.created",
        t,
        "order/7",
    )
    assert (back.origin, back.hops, back.effective_origin) == ("crm", 2, "crm")
    assert back.extensions == {"traceparent": "00-abc-def-01"}
    assert back.seq == 3
    assert back.replay is False


def test_encrypted_body_is_not_plaintext(ring: KeyRing) -> None:
    e = Event(source="shop", type="x", data={"card": "4111-1111"}, datacontenttype=JSON)
    _, body = encode(e, ring)
    assert b"4111" not in body
    assert roundtrip(e, ring).data == {"card": "4111-1111"}


def test_encrypted_without_keyring_is_a_decode_error(ring: KeyRing) -> None:
    headers, body = encode(Event(source="shop", type="x", data=1), ring)
    with pytest.raises(DecodeError, match="no key ring"):
        decode("mesh.evt.shop.x", headers, body, None)


def test_encrypted_with_other_key_is_a_decode_error(ring: KeyRing, tmp_path: Path) -> None:
    other = KeyRing.load(tmp_path / "other.json")
    headers, body = encode(Event(source="shop", type="x", data=1), ring)
    with pytest.raises(DecodeError, match="cannot be decrypted"):
        decode("mesh.evt.shop.x", headers, body, other)


def test_unknown_encryption_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="unknown encryption"):
        decode("mesh.evt.shop.x", {"mesh-encryption": "rot13"}, b"x", None)


def test_empty_data_roundtrips() -> None:
    assert roundtrip(Event(source="s", type="t", data=b""), None, False).data == b""
    assert roundtrip(Event(source="s", type="t", data=None), None, False).data is None
    e = Event(source="s", type="t", data="", datacontenttype="text/plain")
    assert roundtrip(e, None, False).data == ""


def test_unencodable_data() -> None:
    with pytest.raises(ValidationError):
        encode(Event(source="s", type="t", data={1, 2}), None, False)
    with pytest.raises(ValidationError):
        encode(Event(source="s", type="t", data=object(), datacontenttype=JSON), None, False)


# Plain messages (what `nats pub` sends) --------------------------------------


def test_plain_json_message() -> None:
    e = decode("mesh.evt.shop.order.created", None, b'{"id": 7}', None, seq=42)
    assert (e.source, e.type, e.data, e.id) == ("shop", "order.created", {"id": 7}, "seq-42")
    assert e.datacontenttype == JSON
    assert e.hops == 0 and e.effective_origin == "shop"


def test_plain_message_keeps_its_msg_id() -> None:
    e = decode("mesh.evt.shop.x", {"Nats-Msg-Id": "abc"}, b"[1,2]", None, seq=1)
    assert (e.id, e.data) == ("abc", [1, 2])


def test_plain_bytes_message() -> None:
    e = decode("mesh.evt.shop.x", {}, b"\xff\x00not json", None, seq=1)
    assert (e.data, e.datacontenttype) == (b"\xff\x00not json", OCTETS)
    assert decode("mesh.evt.shop.x", {}, b"", None, seq=1).data is None


def test_plain_replay_subject() -> None:
    e = decode("mesh.replay.billing.shop.order.created", None, b"1", None, seq=9)
    assert (e.source, e.type, e.data) == ("shop", "order.created", 1)


# Forged and broken messages ---------------------------------------------------


def good() -> tuple[dict[str, str], bytes]:
    return encode(Event(source="shop", type="order.created", data={"a": 1}), None, False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ce-source": "bank"}, "ce-source"),
        ({"ce-type": "order.paid"}, "ce-type"),
        ({"ce-specversion": "0.3"}, "specversion"),
        ({"ce-meshhops": "many"}, "meshhops"),
        ({"ce-meshhops": "-1"}, "meshhops"),
        ({"ce-time": "yesterday"}, "ce-time"),
        ({"ce-datacontenttype": "application/json"}, "not valid application/json"),
    ],
)
def test_forged_headers_are_decode_errors(change: dict[str, str], message: str) -> None:
    headers, body = good()
    headers.update(change)
    with pytest.raises(DecodeError, match=message):
        decode("mesh.evt.shop.order.created", headers, body, None)


def test_missing_source_header_is_a_decode_error() -> None:
    headers, body = good()
    del headers["ce-source"]
    with pytest.raises(DecodeError):
        decode("mesh.evt.shop.order.created", headers, body, None)


def test_garbage_msgpack_body() -> None:
    headers, _ = good()
    with pytest.raises(DecodeError):
        decode("mesh.evt.shop.order.created", headers, b"\xc1\xc1\xc1", None)


@pytest.mark.parametrize("subject", ["mesh.evt.shop", "mesh.rpc.t.x", "other.evt.shop.x", "x"])
def test_not_an_event_subject(subject: str) -> None:
    with pytest.raises(DecodeError):
        decode(subject, None, b"{}", None)


def test_replay_flag() -> None:
    e = Event(source="shop", type="x", data=1, replay=True)
    headers, body = encode(e, None, False)
    assert decode("mesh.evt.shop.x", headers, body, None).replay is True
    headers, body = encode(Event(source="shop", type="x", data=1), None, False)
    assert decode("mesh.replay.t.shop.x", headers, body, None).replay is True


def test_json_data_is_jsonable() -> None:
    e = Event(source="s", type="t", data={"b": b"ok", "raw": b"\xff", "l": (1, 2)})
    doc = e.json_data()
    assert json.loads(json.dumps(doc)) == {"b": "ok", "raw": "/w==", "l": [1, 2]}


def test_msgpack_is_the_default_for_dicts() -> None:
    headers, body = encode(Event(source="s", type="t", data={"a": 1}), None, False)
    assert headers["ce-datacontenttype"] == MSGPACK
    assert msgpack.unpackb(body) == {"a": 1}
    assert envelope.new_event_id() != envelope.new_event_id()
