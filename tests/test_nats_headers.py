"""The mesh's header parser (mesh/_nats/headers.py) answers as nats.py's own does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from mesh._nats.headers import MeshNats, parse_header_lines
from mesh._nats.port import JetStreamPort

NASTY = b" \t\r\n:\x1c\x1d\x1e\x1f\x0b\x0c\x85\xa0\xc3\xa9\xffaZ-_0"


def test_a_mesh_event_block() -> None:
    raw = (
        b"ce-id: 0123\r\nce-source: shop\r\nce-type: order.created\r\n"
        b"Nats-Msg-Id: 0123\r\nmesh-encryption: fernet\r\nce-x:caf\xc3\xa9 \r\n\r\n"
    )
    assert parse_header_lines(raw) == NATS._parse_header_lines(raw)
    assert parse_header_lines(raw)["ce-x"] == "café"


@given(st.lists(st.binary(max_size=12) | st.sampled_from([b"a b: c", b"\x1cx: y", b": v"])))
def test_same_answer_as_nats_py(parts: list[bytes]) -> None:
    raw = b"\r\n".join(parts)
    assert parse_header_lines(raw) == NATS._parse_header_lines(raw)


@given(st.text(alphabet=st.sampled_from([chr(b) for b in NASTY]), max_size=40))
def test_same_answer_on_whitespace_and_colons(text: str) -> None:
    raw = text.encode("latin-1")
    assert parse_header_lines(raw) == NATS._parse_header_lines(raw)


@given(
    st.text(
        alphabet=st.sampled_from([chr(b) for b in range(0x21)] + list(":aZ-~\x7f")), max_size=40
    )
)
def test_same_answer_on_ascii_blocks(text: str) -> None:
    # The all-ASCII path (every control character, space, colon, CR and LF).
    raw = text.encode("ascii")
    assert parse_header_lines(raw) == NATS._parse_header_lines(raw)


def test_the_port_connects_with_it() -> None:
    assert isinstance(JetStreamPort().nc, MeshNats)
