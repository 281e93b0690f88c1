"""mesh.signing against the reference ``standardwebhooks`` implementation."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from mesh.errors import ValidationError
from mesh.registry import generate_secret
from mesh.signing import (
    SignatureError,
    Signer,
    decode_secret,
    sign,
    signature_headers,
    verify,
)
from tests.support.receiver import new_secret


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=64),
    msg_id=st.text(alphabet="abcdef0123456789_-", min_size=1, max_size=40),
    body=st.text(max_size=200),
    ts=st.integers(min_value=0, max_value=4_000_000_000),
)
def test_signature_matches_the_reference_library(
    key: bytes, msg_id: str, body: str, ts: int
) -> None:
    secret = "whsec_" + base64.b64encode(key).decode()
    ours = sign(msg_id, ts, body.encode(), [secret])
    theirs = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, UTC), body)
    assert ours == theirs


def test_reference_library_verifies_our_headers() -> None:
    secret = new_secret()
    body = b'{"type":"a.b","timestamp":"2025-01-01T00:00:00Z","data":{"x":1}}'
    headers = signature_headers("evt_1", body, secret)
    assert Webhook(secret).verify(body, headers) == {
        "type": "a.b",
        "timestamp": "2025-01-01T00:00:00Z",
        "data": {"x": 1},
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_rotation_signs_with_both_and_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"n":1}'
    headers = Signer([new, old]).headers("evt_2", body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)
    assert verify(body, headers, f"{old} {new}") == "evt_2"
    assert verify(body, headers, [old]) == "evt_2"


def test_our_verify_accepts_the_reference_signature() -> None:
    secret = new_secret()
    now = datetime.now(UTC)
    body = '{"ok":true}'
    headers = {
        "webhook-id": "m1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign("m1", now, body),
    }
    assert verify(body.encode(), headers, secret) == "m1"


def test_verify_refuses_tampering_staleness_and_missing_headers() -> None:
    secret = new_secret()
    body = b"{}"
    headers = signature_headers("m2", body, secret)
    with pytest.raises(SignatureError, match="no matching"):
        verify(b'{"x":1}', headers, secret)
    with pytest.raises(SignatureError, match="no matching"):
        verify(body, headers, new_secret())
    with pytest.raises(SignatureError, match="tolerance"):
        verify(body, headers, secret, now=time.time() + 301)
    stale = signature_headers("m2", body, secret, timestamp=int(time.time()) - 3600)
    with pytest.raises(SignatureError, match="tolerance"):
        verify(body, stale, secret)
    with pytest.raises(SignatureError, match="missing"):
        verify(body, {"webhook-id": "m2"}, secret)
    bad_ts = dict(headers, **{"webhook-timestamp": "soon"})
    with pytest.raises(SignatureError, match="integer"):
        verify(body, bad_ts, secret)
    other_versions = dict(headers, **{"webhook-signature": "v2,abc v1a,zzz"})
    with pytest.raises(SignatureError):
        verify(body, other_versions, secret)


def test_secret_decoding_matches_the_library() -> None:
    key = bytes(range(24))
    padded = "whsec_" + base64.b64encode(key).decode()
    assert decode_secret(padded) == key == Webhook(padded)._whsecret
    odd = bytes(range(10))  # base64 with '=' padding, accepted unpadded too
    unpadded = "whsec_" + base64.b64encode(odd).decode().rstrip("=")
    assert decode_secret(unpadded) == odd == Webhook(unpadded)._whsecret
    assert decode_secret(b"raw-key") == b"raw-key"


@pytest.mark.parametrize("secret", ["whsec_", "whsec_a", ""])
def test_unusable_secrets_are_clear_errors(secret: str) -> None:
    with pytest.raises(ValidationError):
        decode_secret(secret)
    with pytest.raises(ValidationError):
        Signer([])


def test_generated_secrets_work_with_the_reference_library() -> None:
    for _ in range(300):
        secret = generate_secret()
        key = Webhook(secret)._whsecret  # raises on a malformed secret
        assert key == decode_secret(secret)
        assert len(key) == 24
