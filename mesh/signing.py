"""Standard Webhooks signatures (https://www.standardwebhooks.com).

Three headers go with every request::

    webhook-id:        the event id (the same on every retry, so receivers can dedupe)
    webhook-timestamp: integer Unix seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")> [v1,<...> ...]

A secret is ``whsec_`` + base64 of the key bytes. The key is decoded exactly as the
reference ``standardwebhooks`` library does (standard alphabet, padding optional), so a
receiver using any conforming verifier agrees with us. During a rotation both secrets
sign; the signatures are space separated and a verifier accepts either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

from mesh.errors import ValidationError

SECRET_PREFIX = "whsec_"
VERSION = "v1"
DEFAULT_TOLERANCE_S = 300

H_ID = "webhook-id"
H_TIMESTAMP = "webhook-timestamp"
H_SIGNATURE = "webhook-signature"


class SignatureError(ValidationError):
    """A request whose signature headers are missing, stale or wrong."""


def decode_secret(secret: str | bytes) -> bytes:
    """The HMAC key of a ``whsec_`` secret (bytes pass through as the key itself)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        text = secret.removeprefix(SECRET_PREFIX)
        try:
            # Same decoding as the reference library: unpadded input is fine.
            key = base64.b64decode(text + "==")
        except (binascii.Error, ValueError):
            raise ValidationError("webhook secret is not valid base64 after 'whsec_'") from None
    if not key:
        raise ValidationError("webhook secret is empty")
    return key


def sign_one(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature."""
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256)
    return f"{VERSION},{base64.b64encode(mac.digest()).decode()}"


class Signer:
    """Signs with one or more secrets; keys are decoded once."""

    def __init__(self, secrets: Sequence[str | bytes]) -> None:
        if not secrets:
            raise ValidationError("at least one webhook secret is needed to sign")
        self.keys = [decode_secret(s) for s in secrets]

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        return " ".join(sign_one(k, msg_id, timestamp, body) for k in self.keys)

    def headers(self, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        ts = int(time.time()) if timestamp is None else timestamp
        return {
            H_ID: msg_id,
            H_TIMESTAMP: str(ts),
            H_SIGNATURE: self.signature(msg_id, ts, body),
        }


def sign(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[str | bytes] | str) -> str:
    """The ``webhook-signature`` value; ``secrets`` may be one string, space separated."""
    if isinstance(secrets, str):
        secrets = secrets.split()
    return Signer(secrets).signature(msg_id, timestamp, body)


def signature_headers(
    msg_id: str, body: bytes, secrets: Sequence[str | bytes] | str, timestamp: int | None = None
) -> dict[str, str]:
    if isinstance(secrets, str):
        secrets = secrets.split()
    return Signer(secrets).headers(msg_id, body, timestamp)


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str | bytes] | str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> str:
    """Check a received request; returns its ``webhook-id``. Raises SignatureError.

    Any of ``secrets`` (a sequence, or one space-separated string) may have signed it.
    """
    if isinstance(secrets, str):
        secrets = secrets.split()
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get(H_ID)
    ts_text = lower.get(H_TIMESTAMP)
    sig_text = lower.get(H_SIGNATURE)
    if not (msg_id and ts_text and sig_text):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(ts_text)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    offered: list[bytes] = []
    for part in sig_text.split():
        version, _, value = part.partition(",")
        if version != VERSION:
            continue
        try:
            offered.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    for secret in secrets:
        expected = sign_one(decode_secret(secret), msg_id, ts, body).partition(",")[2]
        raw = base64.b64decode(expected)
        if any(hmac.compare_digest(raw, o) for o in offered):
            return msg_id
    raise SignatureError("no matching signature")
