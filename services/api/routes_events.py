"""Publishing: ``POST /v1/events`` (one) and ``POST /v1/events:batch`` (up to 1,000).

Both answer 202 once JetStream has acked every event (``MeshClient.publish_event`` /
``publish_many``: the same path as the CLI and the Python client). With an
``Idempotency-Key`` header the first answer is stored (``idempotency.py``) and
returned again for 24 h; the events' ids are then derived from the key, so a
request that is retried after a crash publishes the same ids.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from mesh.apikeys import Scope
from mesh.envelope import Event
from mesh.subjects import qualify
from mesh.tenants import DEFAULT
from services.api import idempotency as idem
from services.api.problems import (
    BAD_REQUEST,
    IDEMPOTENCY_IN_PROGRESS,
    IDEMPOTENCY_REUSED,
    ApiProblem,
)
from services.api.quotas import take_publish_quota
from services.api.routing import NAME_PATTERN, Call, Param, Reply, Route, RouteTable

MAX_BATCH = 1000
TYPE_PATTERN = r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})*$"
IDEMPOTENCY_HEADER = "Idempotency-Key"

SourceName = Annotated[
    str, Field(pattern=NAME_PATTERN, description="The publishing service's name")
]


class EventIn(BaseModel):
    source: SourceName
    type: str = Field(
        max_length=255, pattern=TYPE_PATTERN, description="Dot-separated tokens, e.g. order.created"
    )
    data: Any = Field(default=None, description="Any JSON value")
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[!-~]+$",
        description="The event id, visible ASCII (default: a new one); the same id twice is"
        " stored once",
    )
    subject: str | None = Field(default=None, max_length=255, description="CloudEvents subject")


class BatchIn(BaseModel):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_BATCH)


class Published(BaseModel):
    id: str


class PublishedBatch(BaseModel):
    ids: list[str]


def _build(call: Call, e: EventIn, derived: str | None) -> Event:
    # A tenant key's events travel under its tenant's qualified source (mesh/subjects.py).
    source = qualify(call.tenant, e.source)
    return call.api.client.build(source, e.type, e.data, id=e.id or derived, subject=e.subject)


async def _keyed(call: Call, run: Any) -> Reply:
    """Run ``run(idem_key | None)`` once per Idempotency-Key; replay the stored answer."""
    idem_key = call.header(IDEMPOTENCY_HEADER)
    if idem_key is None:
        return Reply(await run(None))
    if not idem.valid_key(idem_key):
        raise ApiProblem(
            BAD_REQUEST, f"{IDEMPOTENCY_HEADER} is 1-{idem.MAX_KEY} printable ASCII characters"
        )
    assert call.key is not None
    store = call.api.idempotency
    fp = idem.fingerprint(call.request.method, call.request.path, await call.request.read())
    entry_key = store.entry_key(call.key.id, idem_key)
    try:
        claim = await store.begin(entry_key, fp)
    except idem.Reused:
        raise ApiProblem(
            IDEMPOTENCY_REUSED, f"this {IDEMPOTENCY_HEADER} was used for a different request"
        ) from None
    except idem.InProgress:
        raise ApiProblem(
            IDEMPOTENCY_IN_PROGRESS, "the first request with this key has not finished; retry"
        ) from None
    if claim.replay is not None:
        return Reply(
            claim.replay.body,
            status=claim.replay.status,
            headers={"Idempotent-Replayed": "true"},
        )
    try:
        answer = await run(idem_key)
    except BaseException:
        await store.abandon(claim)
        raise
    await store.finish(claim, fp, 202, answer.model_dump(mode="json"))
    return Reply(answer)


async def publish(call: Call) -> Reply:
    body: EventIn = call.body

    async def run(idem_key: str | None) -> Published:
        derived = idem.derived_id(call.key.id, idem_key) if idem_key and call.key else None
        event = _build(call, body, derived)
        await take_publish_quota(call, call.tenant or DEFAULT)
        await call.api.client.publish_event(event)
        return Published(id=event.id)

    return await _keyed(call, run)


async def publish_batch(call: Call) -> Reply:
    body: BatchIn = call.body

    async def run(idem_key: str | None) -> PublishedBatch:
        events = []
        for i, e in enumerate(body.events):
            derived = idem.derived_id(call.key.id, idem_key, i) if idem_key and call.key else None
            events.append(_build(call, e, derived))
        await take_publish_quota(call, call.tenant or DEFAULT, len(events))
        await call.api.client.publish_many(events)
        return PublishedBatch(ids=[e.id for e in events])

    return await _keyed(call, run)


IDEMPOTENCY_PARAM = Param(
    IDEMPOTENCY_HEADER,
    "header",
    "Makes a retried publish return the first answer (kept 24 h); scoped to the API key",
    required=False,
    max_length=idem.MAX_KEY,
    pattern=r"^[\x20-\x7e]+$",
)


def register(table: RouteTable) -> None:
    table.extend(
        [
            Route(
                "POST",
                "/v1/events",
                publish,
                "Publish one event",
                ("events",),
                Scope.PUBLISH,
                "publishEvent",
                body=EventIn,
                response=Published,
                status=202,
                problems=(409, 429),
                params=(IDEMPOTENCY_PARAM,),
                description="Answers once JetStream has stored the event.",
            ),
            Route(
                "POST",
                "/v1/events:batch",
                publish_batch,
                f"Publish up to {MAX_BATCH} events",
                ("events",),
                Scope.PUBLISH,
                "publishEvents",
                body=BatchIn,
                response=PublishedBatch,
                status=202,
                problems=(409, 429),
                params=(IDEMPOTENCY_PARAM,),
                description="Answers once JetStream has stored every event; ids in request order.",
            ),
        ],
        tenant_aware=True,  # a tenant key publishes as its tenant
    )
