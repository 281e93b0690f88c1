"""Every change made through the API lands in the sink's ``audit_log``, with the key id.

The API owns no database connection (it is stateless), so it publishes an
``AuditRecord`` on ``<prefix>.sys.audit.<kind>`` (stream ``MESH_SYS``,
``Nats-Msg-Id`` = the record id, acked before the answer goes out) and the sink
appends it to ``audit_log`` (``actor`` = ``apikey:<id>``), once per record id.
Values are the public forms (``Target.public()``): never a secret or a key.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from mesh.client import MeshClient
from mesh.errors import BrokerError
from mesh.records import AuditRecord

TIMEOUT_S = 5.0
RETRY_PAUSES_S = (0.2, 1.0)  # then the change's answer is a 503 that says so

log = structlog.get_logger("mesh.api")


class Auditor:
    def __init__(self, client: MeshClient) -> None:
        self.client = client

    async def record(
        self, actor: str, action: str, entity: str, before: Any = None, after: Any = None
    ) -> AuditRecord:
        rec = AuditRecord(actor=actor, action=action, entity=entity, before=before, after=after)
        kind = action.split(".", 1)[0]
        last: BaseException | None = None
        for pause in (*RETRY_PAUSES_S, None):
            try:
                await self.client.port.publish(
                    self.client.subjects.audit(kind),
                    rec.to_bytes(),
                    timeout=TIMEOUT_S,
                    headers={"Nats-Msg-Id": f"audit-{rec.id}"},  # a retry is stored once
                )
                break
            except Exception as exc:  # nats.js errors: no stream, timeout, refused
                last = exc
                if pause is None:
                    log.error(
                        "audit record not stored", action=action, entity=entity, error=repr(exc)
                    )
                    raise BrokerError(
                        f"{action} of {entity} was made, but its audit record could not be"
                        f" stored ({type(last).__name__})"
                    ) from None
                await asyncio.sleep(pause)
        return rec
