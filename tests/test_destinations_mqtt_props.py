"""The MQTT driver's own packing of a PUBLISH's properties is paho's, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("paho.mqtt")

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.egress.drivers.mqtt import publish_properties

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


def paho(ctype: str, user: list[tuple[str, str]]) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = ctype
    props.UserProperty = user
    return bytes(props.pack())


def test_a_cloudevent() -> None:
    user = [("specversion", "1.0"), ("id", "e1"), ("source", "shop"), ("type", "order.créé")]
    packed = publish_properties("application/json", user)
    assert isinstance(packed, Properties)
    assert packed.pack() == paho("application/json", user)


@given(TEXT, st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=12))
def test_same_bytes_as_paho(ctype: str, user: list[tuple[str, str]]) -> None:
    assert publish_properties(ctype, user).pack() == paho(ctype, user)
