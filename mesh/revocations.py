"""Revoked bridge tokens, kept in a JetStream KV bucket (``<PREFIX>_REVOKED``).

Two kinds of entry, each a ``Revocation`` as JSON::

    jti.<jti>               one token, by its id (``mesh token revoke JTI``)
    target.<name>           every token of a default-tenant target issued before
                            ``not_before`` (``mesh token revoke --target T --all``; a
                            later one moves it on)
    target.<tenant>.<name>  the same for tenant ``tenant``'s target (``~tenant.name``),
                            as the registry keys targets; a token carries its tenant

Entries written before targets were per tenant have no ``tenant``: they cover the
tokens of that name in every tenant, as they did when they were written.

No list of issued tokens is kept. Each entry is written with a per-message TTL
(``Nats-TTL``, nats-server 2.11+) and goes by itself once no token it covers can
still be valid: a token's own expiry when it is known, else ``tokens.MAX_TTL``,
the longest a token may live.

The bridge reads the entries of a token before letting a client in
(``refusal``), and watches the bucket to close live sessions whose token is
revoked, whichever process wrote the entry.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

import structlog
from pydantic import BaseModel
from pydantic import ValidationError as PydValidationError

from mesh._nats.buckets import read
from mesh._nats.types import KeyValue, nats_errors
from mesh.errors import BrokerError, ValidationError
from mesh.subjects import DEFAULT_TENANT, target_ref, validate_name
from mesh.tokens import LEEWAY_S, MAX_TTL, TokenClaims, validate_jti

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

log = structlog.get_logger("mesh.tokens")

MAX_REASON = 200


class RevocationKind(StrEnum):
    TOKEN = "token"  # one token, by jti
    TARGET = "target"  # every token of a target issued before not_before


def target_key(tenant: str | None, name: str) -> str:
    """The bucket key of target revocations: ``target.<name>`` in the default tenant (and
    for entries from before tenants), ``target.<tenant>.<name>`` in another."""
    if tenant is None or tenant == DEFAULT_TENANT:
        return f"target.{name}"
    return f"target.{tenant}.{name}"


class Revocation(BaseModel):
    kind: RevocationKind
    id: str  # the jti, or the target name
    reason: str = ""
    revoked_at: datetime
    kept_until: datetime  # when the entry expires: no token it covers is valid by then
    by: str = ""
    not_before: datetime | None = None  # target: tokens issued before this are revoked
    # target: the target's tenant; None on entries from before tenants (every tenant's)
    tenant: str | None = None

    @property
    def key(self) -> str:
        if self.kind == RevocationKind.TOKEN:
            return f"jti.{self.id}"
        return target_key(self.tenant, self.id)

    @property
    def target(self) -> str:
        """The target as an operator names it (``~tenant.name`` for a tenant's)."""
        return target_ref(self.tenant, self.id)

    def covers(self, claims: TokenClaims) -> bool:
        if self.kind == RevocationKind.TOKEN:
            return claims.jti == self.id
        assert self.not_before is not None
        tenant_ok = self.tenant is None or self.tenant == claims.tenant
        return tenant_ok and claims.target == self.id and claims.issued_at < self.not_before

    def describe(self) -> str:
        """The reason a client is given (401 body, close frame): short, never the token."""
        why = f": {self.reason}" if self.reason else ""
        if self.kind == RevocationKind.TOKEN:
            return f"token revoked{why}"
        assert self.not_before is not None
        cut = self.not_before.astimezone(UTC).isoformat(timespec="seconds")
        return f"token revoked (target {self.target}: all tokens issued before {cut}){why}"


def _keys(claims: TokenClaims) -> tuple[str, ...]:
    """The entries that may cover a token: its own, its target's, and (a tenant's token)
    an entry from before tenants under the plain name, which covers every tenant."""
    own = (f"jti.{claims.jti}", target_key(claims.tenant, claims.target))
    if claims.tenant == DEFAULT_TENANT:
        return own
    return (*own, target_key(None, claims.target))


def who() -> str:
    """``user@host`` of the process revoking, for the audit trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if len(reason) > MAX_REASON:
        raise ValidationError(f"--reason is at most {MAX_REASON} characters")
    if any(not c.isprintable() for c in reason):
        raise ValidationError("--reason must be one line of printable text")
    return reason


class RevocationStore:
    """The bucket of revocations."""

    def __init__(self, port: JetStreamPort, kv: KeyValue, bucket: str) -> None:
        self.port = port
        self.kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, port: JetStreamPort, bucket: str, replicas: int = 1) -> RevocationStore:
        # nats.py creates the bucket's stream with per-message TTLs allowed.
        kv = await port.open_bucket(bucket, history=1, replicas=replicas)
        return cls(port, kv, bucket)

    async def _put(self, rev: Revocation, now: datetime) -> None:
        ttl = max(1.0, (rev.kept_until - now).total_seconds())
        # A put with a TTL: nats.py's KeyValue.put takes none (create does, but only for a
        # new key, and a target's entry is moved on by a later --all).
        try:
            await self.port.publish(
                f"$KV.{self.bucket}.{rev.key}",
                rev.model_dump_json().encode(),
                stream=f"KV_{self.bucket}",
                msg_ttl=ttl,
            )
        except (nats_errors.Error, TimeoutError) as exc:
            # e.g. a server before 2.11, which knows no per-message TTL
            raise BrokerError(
                f"cannot store the revocation in {self.bucket}: {str(exc) or type(exc).__name__}"
            ) from None

    async def revoke_token(
        self,
        jti: str,
        *,
        reason: str = "",
        by: str = "",
        expires_at: datetime | None = None,
        now: datetime | None = None,
    ) -> tuple[Revocation, bool]:
        """Revoke one token; returns the entry and whether it is new (not revoked before)."""
        validate_jti(jti)
        now = now or datetime.now(UTC)
        found = await self.get(f"jti.{jti}")
        if found is not None:
            return found, False
        until = expires_at if expires_at is not None else now + MAX_TTL
        rev = Revocation(
            kind=RevocationKind.TOKEN,
            id=jti,
            reason=check_reason(reason),
            revoked_at=now,
            kept_until=until + timedelta(seconds=LEEWAY_S),
            by=by,
        )
        await self._put(rev, now)
        log.info("bridge token revoked", jti=jti, reason=rev.reason, by=by)
        return rev, True

    async def revoke_target(
        self,
        target: str,
        *,
        tenant: str = DEFAULT_TENANT,
        reason: str = "",
        by: str = "",
        now: datetime | None = None,
    ) -> Revocation:
        """Revoke every token of tenant ``tenant``'s ``target`` issued before ``now``."""
        validate_name(target, "target name")
        validate_name(tenant, "tenant")
        now = now or datetime.now(UTC)
        rev = Revocation(
            kind=RevocationKind.TARGET,
            id=target,
            tenant=tenant,
            reason=check_reason(reason),
            revoked_at=now,
            kept_until=now + MAX_TTL + timedelta(seconds=LEEWAY_S),
            by=by,
            not_before=now,
        )
        await self._put(rev, now)
        log.info(
            "bridge tokens of a target revoked",
            target=rev.target,
            not_before=now.isoformat(),
            reason=rev.reason,
            by=by,
        )
        return rev

    async def get(self, key: str) -> Revocation | None:
        got = await read(self.kv, key)  # None also when deleted, purged or expired
        return parse(got[0]) if got is not None else None

    async def refusal(self, claims: TokenClaims) -> Revocation | None:
        """The revocation covering a token, read from the bucket (not a cache), or None."""
        for key in _keys(claims):
            rev = await self.get(key)
            if rev is not None and rev.covers(claims):
                return rev
        return None

    async def list(self) -> list[Revocation]:
        """The revocations in force (read key by key: see mesh/buckets.read_all)."""
        out = []
        for key, raw in (await self.port.read_all(self.kv, self.bucket)).items():
            rev = parse(raw)
            if rev is None:
                log.warning("unreadable revocation entry skipped", key=key)
                continue
            out.append(rev)
        return sorted(out, key=lambda r: r.revoked_at)

    async def watch(self) -> AsyncIterator[Revocation | None]:
        """Every entry (first the current ones, then None, then each new one) until cancelled."""
        watcher = await self.kv.watchall(ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:  # end of the current values
                    yield None
                    continue
                if entry.operation is not None:
                    continue
                rev = parse(entry.value)
                if rev is None:
                    log.warning("unreadable revocation entry skipped", key=entry.key)
                    continue
                yield rev
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


def parse(raw: bytes | None) -> Revocation | None:
    if not raw:
        return None
    try:
        return Revocation.model_validate_json(raw)
    except (PydValidationError, json.JSONDecodeError):
        return None


class RevocationView:
    """The revocations a process has seen through a watch, for checks without a round trip."""

    def __init__(self) -> None:
        self._entries: dict[str, Revocation] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, rev: Revocation, now: datetime | None = None) -> bool:
        """Take an entry in; True if it is news (not seen before in this form)."""
        now = now or datetime.now(UTC)
        news = self._entries.get(rev.key) != rev
        self._entries[rev.key] = rev
        # Expired entries vanish from the bucket without a marker: forget them here too.
        for key in [k for k, r in self._entries.items() if r.kept_until < now]:
            del self._entries[key]
        return news

    def refusal(self, claims: TokenClaims) -> Revocation | None:
        for key in _keys(claims):
            rev = self._entries.get(key)
            if rev is not None and rev.covers(claims):
                return rev
        return None
