"""A client's ``{"publish": {...}}`` frame: checked against its token, published, and
the answer frame (``published`` with the id, or ``refused`` with the reason)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh import envelope, tracing
from mesh.errors import MeshError
from mesh.subjects import qualify
from mesh.tokens import TokenClaims

if TYPE_CHECKING:
    from mesh.client import MeshClient


async def publish_frame(client: MeshClient, claims: TokenClaims, req: Any) -> dict[str, Any]:
    if not isinstance(req, dict):
        return {"error": "publish takes an object", "refused": "publish"}
    ref = req.get("ref")
    source = req.get("source") or (claims.publish_as[0] if claims.publish_as else "")
    answer: dict[str, Any] = {"refused": "publish"}
    if ref is not None:
        answer["ref"] = ref
    if not isinstance(source, str) or not claims.may_publish_as(source):
        answer["error"] = f"this token may not publish as {source!r}"
        return answer
    event_type, event_id = req.get("type"), req.get("id")
    if not isinstance(event_type, str) or (event_id is not None and not isinstance(event_id, str)):
        answer["error"] = "publish needs a string type (and an optional string id)"
        return answer
    try:
        event = client.build(
            qualify(claims.tenant, source),  # a tenant's token publishes its sources
            event_type,
            req.get("data"),
            id=event_id,
            datacontenttype=envelope.JSON,
        )
        event.extensions.update(tracing.context_from_headers(req))  # the client's trace
        new = await client.publish_event(event)
    except MeshError as exc:
        answer["error"] = str(exc)
        return answer
    reply: dict[str, Any] = {"published": {"id": event.id, "duplicate": not new}}
    if ref is not None:
        reply["ref"] = ref
    return reply
