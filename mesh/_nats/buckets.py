"""JetStream key-value buckets: opening (creating when missing) and reading safely."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors as js_errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from mesh.resilience import retry_transient


def transient_js_error(exc: BaseException) -> bool:
    """A JetStream answer that a moment later may be different: no leader yet ("JetStream
    system temporarily unavailable", 503) or no answer in time."""
    return isinstance(exc, js_errors.ServiceUnavailableError | nats.errors.TimeoutError)


async def open_bucket(
    js: JetStreamContext, bucket: str, *, history: int = 1, replicas: int = 1
) -> KeyValue:
    """The bucket ``bucket``; created with ``history`` and ``replicas`` when missing.

    Several processes may start at once: when another one created the bucket between
    our look and our create, the create is refused and the bucket is opened instead.
    A create refused while an earlier one (ours, timed out, or another process's) is still
    being applied leaves the bucket not yet there: that, a 503 and a timeout are tried
    again for a while (seen on a freshly started cluster under load).
    """

    async def once() -> KeyValue:
        try:
            return await js.key_value(bucket)
        except js_errors.BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(bucket=bucket, history=history, replicas=replicas)
        except js_errors.BadRequestError:
            return await js.key_value(bucket)

    return await retry_transient(
        once,
        lambda exc: transient_js_error(exc) or isinstance(exc, js_errors.BucketNotFoundError),
    )


async def read(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    """A key's value and revision; None when it was never written, or was deleted, purged
    or expired (nats.py raises KeyDeletedError for those, which is no KeyNotFoundError)."""
    try:
        entry = await kv.get(key)
    except (js_errors.KeyNotFoundError, js_errors.KeyDeletedError):
        return None
    if entry.value is None:
        return None
    return entry.value, entry.revision or 0


async def read_all(js: JetStreamContext, kv: KeyValue, bucket: str) -> dict[str, bytes]:
    """Every live key of a bucket and its value: the bucket's subjects, then each key.

    Not through a KV watcher. nats.py's watcher can signal "end of the initial values"
    before they arrived (its consumer-info reply may overtake the pushed messages), so a
    bucket could read as empty (the registry did, and ``reconcile_all`` deleted every
    target's consumer); each watcher also leaves an ephemeral consumer on the bucket's
    stream for five minutes, and the server refuses new ones past a thousand.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + ">")
    keys = [subject.removeprefix(prefix) for subject in info.state.subjects or {}]
    values = await asyncio.gather(*(read(kv, key) for key in keys))
    return {key: got[0] for key, got in zip(keys, values, strict=True) if got is not None}
