"""Opening a JetStream key-value bucket, creating it when it does not exist yet."""

from __future__ import annotations

import nats.js.errors as js_errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue


async def open_bucket(
    js: JetStreamContext, bucket: str, *, history: int = 1, replicas: int = 1
) -> KeyValue:
    """The bucket ``bucket``; created with ``history`` and ``replicas`` when missing.

    Several processes may start at once: when another one created the bucket between
    our look and our create, the create is refused and the bucket is opened instead.
    """
    try:
        return await js.key_value(bucket)
    except js_errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(bucket=bucket, history=history, replicas=replicas)
    except js_errors.BadRequestError:
        return await js.key_value(bucket)
