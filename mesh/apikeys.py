"""API keys for the HTTP API, kept hashed in a JetStream KV bucket (``<PREFIX>_APIKEYS``).

A key reads ``mk_<id>_<secret>``: ``id`` (12 hex digits) names it in listings,
logs and the audit log; ``secret`` (32 random bytes, URL-safe base64) is shown
once, by ``mesh apikey create``, and stored only as its SHA-256 (a random
256-bit secret needs no slow hash: nobody can guess one to match a hash).
Entries are ``keys.<id>`` -> ``ApiKey`` JSON; revoking marks the entry (so a
listing still shows it) and the API refuses it from then on.

Scopes, each including the one before it::

    read     every GET: targets, propagations, events, deliveries, status
    publish  read, and POST /v1/events (a producer's key)
    admin    everything: targets, propagations, dead letters, replays, bridge tokens

A key made with ``--tenant T`` sees and changes only tenant T's resources (another
tenant's are a 404, never a 403); a key without a tenant is an operator key,
across all tenants (every key made before tenants existed is one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field
from pydantic import ValidationError as PydValidationError

from mesh._nats.buckets import read
from mesh._nats.types import KeyValue, js_errors
from mesh.errors import NotFound, ValidationError
from mesh.subjects import validate_name

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

KEY_PREFIX = "mk_"
_KEY = re.compile(r"mk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID = re.compile(r"[0-9a-f]{12}")
MAX_NAME = 100


class Scope(StrEnum):
    READ = "read"
    PUBLISH = "publish"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Scope) -> bool:
        return self.rank >= needed.rank


_RANK = {Scope.READ: 0, Scope.PUBLISH: 1, Scope.ADMIN: 2}


def _now() -> datetime:
    return datetime.now(UTC)


class ApiKey(BaseModel):
    id: str
    name: str
    scope: Scope
    hash: str = Field(description="hex SHA-256 of the secret part")
    created_at: datetime = Field(default_factory=_now)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    created_by: str = ""
    rate: float | None = Field(default=None, gt=0, description="requests/s; None: the default")
    tenant: str | None = Field(default=None, description="None: an operator key (all tenants)")

    def state(self, now: datetime | None = None) -> str:
        now = now or _now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public(self) -> dict[str, object]:
        """What listings show: never the hash."""
        doc = self.model_dump(mode="json", exclude={"hash"})
        doc["state"] = self.state()
        return doc


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    m = _KEY.fullmatch(text.strip())
    return (m.group(1), m.group(2)) if m else None


def validate_key_id(key_id: str) -> str:
    if not _ID.fullmatch(key_id):
        raise ValidationError(f"invalid API key id {key_id[:40]!r}: an id is 12 hex digits")
    return key_id


class ApiKeyStore:
    """The bucket of API keys."""

    def __init__(self, port: JetStreamPort, kv: KeyValue, bucket: str) -> None:
        self.port = port
        self.kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, port: JetStreamPort, bucket: str, replicas: int = 1) -> ApiKeyStore:
        kv = await port.open_bucket(bucket, history=1, replicas=replicas)
        return cls(port, kv, bucket)

    async def create(
        self,
        name: str,
        scope: Scope,
        *,
        ttl: timedelta | None = None,
        rate: float | None = None,
        by: str = "",
        tenant: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key: its record and the full key text (the only time it exists)."""
        name = name.strip()
        if not name or len(name) > MAX_NAME or any(not c.isprintable() for c in name):
            raise ValidationError(f"a key name is 1 to {MAX_NAME} printable characters")
        if ttl is not None and ttl.total_seconds() <= 0:
            raise ValidationError("--expires must be positive")
        if rate is not None and rate <= 0:
            raise ValidationError("--rate must be positive")
        if tenant is not None:
            validate_name(tenant, "tenant")
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        now = _now()
        for _ in range(3):
            key_id = secrets.token_hex(6)
            record = ApiKey(
                id=key_id,
                name=name,
                scope=scope,
                hash=_digest(secret),
                created_at=now,
                expires_at=now + ttl if ttl is not None else None,
                created_by=by,
                rate=rate,
                tenant=tenant,
            )
            try:
                await self.kv.create(f"keys.{key_id}", record.model_dump_json().encode())
            except js_errors.KeyWrongLastSequenceError:
                continue  # an id collision (2^-48): draw another
            return record, f"{KEY_PREFIX}{key_id}_{secret}"
        raise ValidationError("could not allocate a key id")  # pragma: no cover

    async def get(self, key_id: str) -> ApiKey:
        validate_key_id(key_id)
        found = await read(self.kv, f"keys.{key_id}")
        if found is None:
            raise NotFound(f"unknown API key {key_id!r}")
        return ApiKey.model_validate_json(found[0])

    async def verify(self, text: str, now: datetime | None = None) -> tuple[ApiKey | None, str]:
        """The key's record if ``text`` is a live key, else None and why (never the key)."""
        parsed = parse_key(text)
        if parsed is None:
            return None, "malformed API key"
        key_id, secret = parsed
        found = await read(self.kv, f"keys.{key_id}")
        if found is None:
            return None, "unknown API key"
        try:
            record = ApiKey.model_validate_json(found[0])
        except PydValidationError:
            return None, "unknown API key"
        if not hmac.compare_digest(record.hash, _digest(secret)):
            return None, "unknown API key"  # the same words as unknown: no oracle
        state = record.state(now)
        if state != "active":
            return None, f"API key {state}"
        return record, ""

    async def list(self) -> list[ApiKey]:
        out = []
        for raw in (await self.port.read_all(self.kv, self.bucket)).values():
            try:
                out.append(ApiKey.model_validate_json(raw))
            except PydValidationError:
                continue
        return sorted(out, key=lambda k: k.created_at)

    async def revoke(self, key_id: str, now: datetime | None = None) -> tuple[ApiKey, bool]:
        """Revoke a key; returns it and whether it was live until now."""
        record = await self.get(key_id)
        if record.revoked_at is not None:
            return record, False
        record.revoked_at = now or _now()
        await self.kv.put(f"keys.{key_id}", record.model_dump_json().encode())
        return record, True
