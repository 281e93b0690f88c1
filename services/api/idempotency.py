"""``Idempotency-Key`` on publishes: the first answer, again, for 24 hours.

State lives in a KV bucket (``<PREFIX>_IDEMPOTENCY``, a bucket-wide TTL of 24 h),
never in this process, so every API instance and a restarted one see it. The key
of an entry is ``<api key id>.<sha256 of the header>``: keys of different callers
never meet. One request claims an entry with an atomic KV ``create`` (a
``pending`` record with the request's fingerprint); every concurrent one loses
the create and polls until the winner stores its answer (``done``), then returns
that answer. A claim left by a crashed instance is taken over after ``LEASE_S``
(``update`` on the revision read, so only one taker wins). The event ids of a
keyed publish are derived from the key (``derived_id``), so even a taken-over
claim publishes the same ids, which JetStream's dedupe window stores once.

Only successful answers are kept: a failed request deletes its claim, and the
client's retry with the same key runs again. The same key with a different
request (method, path or body) is a 409 ``idempotency-key-reused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from mesh._nats.buckets import read
from mesh._nats.types import KeyValue, js_errors, nats_errors

if TYPE_CHECKING:
    from mesh._nats.port import JetStreamPort

TTL_S = 24 * 3600.0
LEASE_S = 30.0  # a claim older than this, still pending, belongs to a crashed request
WAIT_S = 15.0  # how long a duplicate waits for the first answer before a 409
POLL_S = 0.02
MAX_POLL_S = 0.25
MAX_KEY = 255
_NAMESPACE = uuid.UUID("5a1f6c3e-3b0e-4c59-9f5e-6d0a9b1c2e7f")


class Entry(BaseModel):
    state: Literal["pending", "done"]
    fingerprint: str
    claimed_at: float  # time.time() of the claim
    status: int | None = None
    body: Any = None


class Claim:
    """What ``IdempotencyStore.begin`` hands back: either an answer to replay, or the lease."""

    def __init__(self, key: str, revision: int | None, entry: Entry | None) -> None:
        self.key = key
        self.revision = revision
        self.replay = entry  # not None: answer with this (status, body) and do nothing


class Reused(Exception):
    """The key was used before for a different request."""


class InProgress(Exception):
    """The first request with this key is still running."""


def valid_key(value: str) -> bool:
    return 0 < len(value) <= MAX_KEY and value.isascii() and value.isprintable()


def derived_id(api_key_id: str, idem_key: str, index: int = 0) -> str:
    """The event id of the ``index``-th event published under an idempotency key."""
    return str(uuid.uuid5(_NAMESPACE, f"{api_key_id}\x00{idem_key}\x00{index}"))


def fingerprint(method: str, path: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


class IdempotencyStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, port: JetStreamPort, bucket: str, replicas: int = 1) -> IdempotencyStore:
        try:
            kv = await port.key_value(bucket)
        except js_errors.BucketNotFoundError:
            try:
                kv = await port.create_key_value(
                    bucket=bucket, history=1, ttl=TTL_S, replicas=replicas
                )
            except js_errors.BadRequestError:  # created by another instance meanwhile
                kv = await port.key_value(bucket)
        return cls(kv)

    @staticmethod
    def entry_key(api_key_id: str, idem_key: str) -> str:
        return f"{api_key_id}.{hashlib.sha256(idem_key.encode()).hexdigest()}"

    async def begin(self, key: str, fp: str, *, wait_s: float | None = None) -> Claim:
        """Claim ``key`` for this request, or return the stored answer to replay."""
        deadline = time.monotonic() + (WAIT_S if wait_s is None else wait_s)
        pause = POLL_S
        while True:
            pending = Entry(state="pending", fingerprint=fp, claimed_at=time.time())
            try:
                rev = await self.kv.create(key, pending.model_dump_json().encode())
                return Claim(key, rev, None)
            except js_errors.KeyWrongLastSequenceError:
                pass
            found = await read(self.kv, key)
            if found is None:
                continue  # deleted (a failed first request) between our create and read
            entry = Entry.model_validate_json(found[0])
            if entry.fingerprint != fp:
                raise Reused()
            if entry.state == "done":
                return Claim(key, found[1], entry)
            if time.time() - entry.claimed_at > LEASE_S:
                try:  # the claimant died: take it over (only one taker's update wins)
                    rev = await self.kv.update(key, pending.model_dump_json().encode(), found[1])
                    return Claim(key, rev, None)
                except js_errors.KeyWrongLastSequenceError:
                    continue
            if time.monotonic() >= deadline:
                raise InProgress()
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, MAX_POLL_S)

    async def finish(self, claim: Claim, fp: str, status: int, body: Any) -> None:
        done = Entry(state="done", fingerprint=fp, claimed_at=time.time(), status=status, body=body)
        await self.kv.put(claim.key, done.model_dump_json().encode())

    async def abandon(self, claim: Claim) -> None:
        """Give the key back after a failure, so that a retry runs again."""
        # Taken over meanwhile (a wrong last sequence): the taker owns it now.
        with contextlib.suppress(js_errors.Error, nats_errors.Error):
            await self.kv.delete(claim.key, last=claim.revision)
