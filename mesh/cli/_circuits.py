"""Circuit state per target for ``mesh status``, read from the egress's shared bucket.

The webhook egress keeps each target's circuit in the ``<PREFIX>_CIRCUITS`` KV bucket
(key = target name, JSON with ``state`` and ``until``; see the egress's circuit module)
and pauses the target's consumer while the circuit is open. The CLI reads the record
without importing the service: ``mesh`` never imports ``services``.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from mesh._nats.types import js_errors
from mesh.client import MeshClient
from mesh.registry import Target, TargetKind
from mesh.subjects import ref_kv

CLOSED, OPEN, HALF_OPEN, PAUSED = "closed", "open", "half-open", "paused"


def circuits_bucket(c: MeshClient) -> str:
    return c.names.events.removesuffix("_EVENTS") + "_CIRCUITS"


def circuit_label(record: dict[str, Any] | None, paused: bool, now: float) -> str:
    """closed / open / half-open from the shared record; ``paused`` for a consumer paused
    with no open circuit behind it (an egress that could not write the bucket, or an
    operator)."""
    state = str((record or {}).get("state") or "closed")
    if state == "open":
        until = float((record or {}).get("until") or 0.0)
        # Past its period the first egress to look takes the probe: half-open in effect.
        return OPEN if until > now or paused else HALF_OPEN
    if state == "half_open":
        return HALF_OPEN
    return PAUSED if paused else CLOSED


async def circuit_states(
    c: MeshClient, targets: list[Target], paused: dict[str, bool]
) -> dict[str, str | None]:
    """``{target reference: label}``; None for targets that have no circuit (not webhooks)."""
    out: dict[str, str | None] = {t.ref: None for t in targets}
    hooks = [t for t in targets if t.kind == TargetKind.WEBHOOK]
    if not hooks:
        return out
    kv = None
    with contextlib.suppress(js_errors.BucketNotFoundError, js_errors.NotFoundError):
        kv = await c.port.key_value(circuits_bucket(c))
    now = time.time()
    for t in hooks:
        record: dict[str, Any] | None = None
        if kv is not None:
            with contextlib.suppress(js_errors.KeyNotFoundError, ValueError, TypeError):
                entry = await kv.get(ref_kv(t.ref))  # as the egress keys it
                doc = json.loads(entry.value or b"null")
                record = doc if isinstance(doc, dict) else None
        out[t.ref] = circuit_label(record, paused.get(t.ref, False), now)
    return out


__all__ = ["circuit_label", "circuit_states"]
