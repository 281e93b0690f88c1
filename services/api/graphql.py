"""GraphQL at ``/v1/graphql``: read-only queries across targets, propagations, events
and delivery attempts, answered in one round trip.

Strawberry parses, validates and executes; this module only declares the types
and resolvers. The schema has no mutations or subscriptions (changes go through
REST, where they are audited), so any key with the ``read`` scope may ask. A
query is bounded: at most ``MAX_DEPTH`` levels deep and ``MAX_TOKENS`` tokens,
pages at most ``MAX_PAGE`` rows. Errors of the caller's making (a bad cursor, an
unknown type pattern) come back with their message in ``errors``; anything else
is masked, never a traceback.

Example::

    { targets { name status propagations { mode source types }
                recentFailures(limit: 3) { at outcome statusCode error } }
      event(id: "...") { type data deliveries { target attempt outcome latencyMs } } }
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import strawberry
from aiohttp import web
from cross_web import HTTPException
from graphql import GraphQLError
from strawberry.aiohttp.views import GraphQLView
from strawberry.extensions import MaskErrors, MaxTokensLimiter, QueryDepthLimiter
from strawberry.scalars import JSON
from strawberry.types import ExecutionContext

from mesh.apikeys import Scope
from mesh.errors import MeshError
from mesh.history import FAILURE_OUTCOMES, PayloadReader, response_excerpt
from mesh.registry import Propagation as PropagationModel
from mesh.registry import PropagationMode, Target
from mesh.storage import DeliveryRow, EventRow, Page, Store, TenantView
from mesh.subjects import split_source
from services.api.problems import (
    BAD_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    UNSUPPORTED_MEDIA,
    ApiProblem,
)

if TYPE_CHECKING:
    from services.api.context import ApiContext

MAX_DEPTH = 8
MAX_TOKENS = 2000
DEFAULT_FAILURES = 20

Snapshot = tuple[list[Target], list[PropagationModel]]


@dataclass
class GraphContext:
    """What resolvers read, one per request; the registry is read once per request, the
    database opened only by a query that needs it."""

    registry: Callable[[], Awaitable[Snapshot]]
    open_store: Callable[[], Awaitable[Store | TenantView]]
    reader: PayloadReader
    _snapshot: asyncio.Task[Snapshot] | None = field(default=None, repr=False)

    async def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            self._snapshot = asyncio.ensure_future(self.registry())
        return await self._snapshot

    async def store(self) -> Store | TenantView:
        return await self.open_store()


def _ctx(info: strawberry.Info) -> GraphContext:
    ctx = info.context["mesh"]
    assert isinstance(ctx, GraphContext)
    return ctx


def _of_tenant(store: Store | TenantView, tenant: str) -> TenantView:
    """``store``'s rows of ``tenant`` (a tenant's view is already its own: kept as it is,
    so asking for another tenant's gives its own, never the other's)."""
    return store if isinstance(store, TenantView) else TenantView(store, tenant)


def _touches(p: PropagationModel, name: str) -> bool:
    """Whether ``p`` sends from or to ``name`` (a broadcast reaches every other target)."""
    return (
        p.source == name
        or name in p.targets
        or (p.mode == PropagationMode.BROADCAST and p.source != name)
    )


@strawberry.type(description="An attempt to deliver one event to one target.")
class Delivery:
    id: str
    event_id: str
    target: str
    attempt: int
    outcome: str
    status_code: int | None
    latency_ms: float | None
    error: str | None
    response_excerpt: str | None = strawberry.field(
        description="The start of the receiver's answer to a failed attempt, if it sent one."
    )
    at: datetime
    instance: str | None
    trace_id: str | None = strawberry.field(
        default=None, description="The W3C trace id the event carried, if any."
    )

    @classmethod
    def of(cls, row: DeliveryRow) -> Delivery:
        return cls(
            id=row.id,
            event_id=row.event_id,
            target=row.target,
            attempt=row.attempt,
            outcome=row.outcome,
            status_code=row.status_code,
            latency_ms=row.latency_ms,
            error=row.error,
            response_excerpt=response_excerpt(row.error),
            at=row.at,
            instance=row.instance,
            trace_id=row.trace_id,
        )

    @strawberry.field(description="The event attempted, if the sink stored it.")
    async def event(self, info: strawberry.Info) -> Event | None:
        row = await (await _ctx(info).store()).get_event(self.event_id)
        return None if row is None else Event.of(row)


@strawberry.type(description="A published event as the sink stored it; data decrypted.")
class Event:
    id: str
    seq: int | None
    source: str
    type: str
    time: datetime
    subject: str
    datacontenttype: str | None
    origin: str | None
    hops: int
    encrypted: bool
    received_at: datetime
    row: strawberry.Private[EventRow]

    @classmethod
    def of(cls, row: EventRow) -> Event:
        return cls(
            id=row.id,
            seq=row.stream_seq,
            source=row.source,
            type=row.type,
            time=row.time,
            subject=row.subject,
            datacontenttype=row.datacontenttype,
            origin=row.origin,
            hops=row.hops,
            encrypted=row.encrypted,
            received_at=row.received_at,
            row=row,
        )

    @strawberry.field(description="The event's data, decoded (and decrypted) as JSON.")
    def data(self, info: strawberry.Info) -> JSON | None:
        return _ctx(info).reader.data(self.row)  # type: ignore[no-any-return]

    @strawberry.field(description="Every delivery attempt for this event, oldest first.")
    async def deliveries(self, info: strawberry.Info) -> list[Delivery]:
        return [Delivery.of(r) for r in await (await _ctx(info).store()).query_deliveries(self.id)]


@strawberry.type
class EventPage:
    items: list[Event]
    next_cursor: str | None = strawberry.field(description="Pass as `after` for the next page.")


@strawberry.type
class DeliveryPage:
    items: list[Delivery]
    next_cursor: str | None = strawberry.field(description="Pass as `after` for the next page.")

    @classmethod
    def of(cls, page: Page[DeliveryRow]) -> DeliveryPage:
        return cls(items=[Delivery.of(r) for r in page.items], next_cursor=page.next_cursor)


@strawberry.type
class Propagation:
    id: str
    mode: str
    source: str
    targets: list[str]
    types: str | None
    created_at: datetime

    @classmethod
    def of(cls, p: PropagationModel) -> Propagation:
        return cls(
            id=p.id,
            mode=p.mode.value,
            source=p.source,
            targets=list(p.targets),
            types=p.types,
            created_at=p.created_at,
        )


@strawberry.type
class RetryPolicy:
    base_s: float
    multiplier: float
    max_delay_s: float
    max_retries: int
    jitter: float


@strawberry.type(name="Target", description="A registered target; secrets are never shown.")
class TargetNode:
    name: str
    tenant: str
    ref: str = strawberry.field(
        description="The target's reference: its name, or ~tenant.name for a tenant's"
    )
    kind: str
    url: str | None
    format: str
    timeout_s: float
    rate: float | None
    max_in_flight: int
    ordered: bool
    circuit_threshold: int
    circuit_open_s: float
    status: str
    status_reason: str | None
    has_secret: bool
    retry: RetryPolicy
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, t: Target) -> TargetNode:
        r = t.retry
        return cls(
            name=t.name,
            tenant=t.tenant,
            ref=t.ref,
            kind=t.kind.value,
            url=t.url,
            format=t.format,
            timeout_s=t.timeout_s,
            rate=t.rate,
            max_in_flight=t.max_in_flight,
            ordered=t.ordered,
            circuit_threshold=t.circuit_threshold,
            circuit_open_s=t.circuit_open_s,
            status=t.status.value,
            status_reason=t.status_reason,
            has_secret=t.secret_enc is not None,
            retry=RetryPolicy(
                base_s=r.base_s,
                multiplier=r.multiplier,
                max_delay_s=r.max_delay_s,
                max_retries=r.max_retries,
                jitter=r.jitter,
            ),
            created_at=t.created_at,
            updated_at=t.updated_at,
        )

    @strawberry.field(description="Propagations sending from or to this target.")
    async def propagations(self, info: strawberry.Info) -> list[Propagation]:
        _, props = await _ctx(info).snapshot()
        mine = [p for p in props if p.tenant == self.tenant]  # names are per tenant
        return [Propagation.of(p) for p in mine if _touches(p, self.name)]

    @strawberry.field(description="Failed attempts (retry, dead, disabled), newest first.")
    async def recent_failures(
        self, info: strawberry.Info, limit: int = DEFAULT_FAILURES
    ) -> list[Delivery] | None:
        page = await _of_tenant(await _ctx(info).store(), self.tenant).list_deliveries(
            target=self.name, outcomes=FAILURE_OUTCOMES, limit=limit
        )
        return [Delivery.of(r) for r in page.items]

    @strawberry.field(description="Delivery attempts to this target, newest first.")
    async def deliveries(
        self,
        info: strawberry.Info,
        outcomes: list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        first: int = 50,
        after: str | None = None,
    ) -> DeliveryPage | None:
        page = await _of_tenant(await _ctx(info).store(), self.tenant).list_deliveries(
            target=self.name, outcomes=outcomes, since=since, until=until, cursor=after, limit=first
        )
        return DeliveryPage.of(page)


@strawberry.type(description="Read-only queries over the registry and the sink's history.")
class Query:
    @strawberry.field(description="Targets by name order; only those named if `names` is given.")
    async def targets(
        self, info: strawberry.Info, names: list[str] | None = None
    ) -> list[TargetNode]:
        targets, _ = await _ctx(info).snapshot()
        wanted = None if names is None else set(names)
        return [
            TargetNode.of(t)
            for t in sorted(targets, key=lambda t: t.name)
            if wanted is None or t.name in wanted
        ]

    @strawberry.field
    async def target(self, info: strawberry.Info, name: str) -> TargetNode | None:
        targets, _ = await _ctx(info).snapshot()
        # A reference (~tenant.name) first: an operator sees several tenants' same name.
        found = [t for t in targets if t.ref == name] or [t for t in targets if t.name == name]
        return TargetNode.of(found[0]) if found else None

    @strawberry.field
    async def propagations(self, info: strawberry.Info) -> list[Propagation]:
        _, props = await _ctx(info).snapshot()
        return [Propagation.of(p) for p in sorted(props, key=lambda p: p.id)]

    @strawberry.field
    async def event(self, info: strawberry.Info, id: str) -> Event | None:
        row = await (await _ctx(info).store()).get_event(id)
        return None if row is None else Event.of(row)

    @strawberry.field(description="Stored events, newest first; `type` may be a pattern.")
    async def events(
        self,
        info: strawberry.Info,
        source: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        first: int = 50,
        after: str | None = None,
    ) -> EventPage | None:
        page = await (await _ctx(info).store()).list_events(
            source=source, type=type, since=since, until=until, cursor=after, limit=first
        )
        return EventPage(items=[Event.of(r) for r in page.items], next_cursor=page.next_cursor)

    @strawberry.field(description="Delivery attempts, newest first.")
    async def deliveries(
        self,
        info: strawberry.Info,
        target: str | None = None,
        outcomes: list[str] | None = None,
        event_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        first: int = 50,
        after: str | None = None,
    ) -> DeliveryPage | None:
        store = await _ctx(info).store()
        if target is not None and target.startswith("~"):  # ~tenant.name: that tenant's
            tenant, target = split_source(target)
            store = _of_tenant(store, tenant)
        page = await store.list_deliveries(
            target=target,
            outcomes=outcomes,
            event_id=event_id,
            since=since,
            until=until,
            cursor=after,
            limit=first,
        )
        return DeliveryPage.of(page)


def _masked(error: GraphQLError) -> bool:
    # Syntax and validation errors (no original) and MeshErrors say what was wrong with the
    # question; any other exception stays private.
    original = error.original_error
    return original is not None and not isinstance(original, MeshError)


class _Schema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Syntax, validation and MeshErrors are the caller's: they are in the answer, and a
        # log line with a traceback each would bury the real faults.
        super().process_errors([e for e in errors if _masked(e)], execution_context)


schema = _Schema(
    query=Query,
    extensions=[
        lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        lambda: MaskErrors(should_mask_error=_masked),
    ],
)

PATH = "/v1/graphql"
#: Builds a request's context after checking its key; raises the API's problems.
ContextSource = Callable[[web.Request], Awaitable[GraphContext]]
#: Turns a transport error (malformed body, wrong method) into the API's problem.
ProblemFor = Callable[[int, str], Exception]
_TRANSPORT = {400: BAD_REQUEST, 404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 415: UNSUPPORTED_MEDIA}


CONTEXT_KEY = web.RequestKey("mesh.graphql", GraphContext)


class MeshGraphQLView(GraphQLView[dict[str, Any], None]):
    """Strawberry's aiohttp view: key checked first, no IDE page (it loads scripts from a
    CDN), queries over POST and GET, transport errors as RFC 9457 problems."""

    def __init__(self, source: ContextSource, problem: ProblemFor) -> None:
        super().__init__(schema=schema, graphql_ide=None, allow_queries_via_get=True)
        self._source = source
        self._problem = problem

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        request[CONTEXT_KEY] = await self._source(request)
        try:
            return await self.run(request=request)
        except HTTPException as exc:
            raise self._problem(exc.status_code, exc.reason) from None

    async def get_context(
        self, request: web.Request, response: web.Response | web.WebSocketResponse
    ) -> dict[str, Any]:
        return {"mesh": request[CONTEXT_KEY], "request": request}


def _problem(status: int, reason: str) -> Exception:
    return ApiProblem(_TRANSPORT.get(status, BAD_REQUEST), reason)


def install(app: web.Application, api: ApiContext) -> None:
    """Serve ``PATH`` on ``app`` (GET and POST) for keys with the ``read`` scope."""

    async def source(request: web.Request) -> GraphContext:
        key = await api.auth.check(request, Scope.READ)
        if key.tenant is not None:  # a tenant key: its own records only (tenant_graph.py)
            return tenant_context(api, key.tenant)
        return GraphContext(api.client.registry.targets_and_propagations, api.store, api.reader)

    view = MeshGraphQLView(source, _problem)
    app.router.add_route("GET", PATH, view)
    app.router.add_route("POST", PATH, view)


def tenant_context(api: ApiContext, tenant: str) -> GraphContext:
    """A context that holds one tenant's targets and propagations, and reads the history
    (events, deliveries) through the tenant's ``TenantView``: the tenant is in the SQL."""

    async def snapshot() -> Snapshot:
        targets, props = await api.client.registry.targets_and_propagations()
        return [t for t in targets if t.tenant == tenant], [p for p in props if p.tenant == tenant]

    async def history() -> Store | TenantView:
        return TenantView(await api.store(), tenant)

    return GraphContext(snapshot, history, api.reader)


def sdl() -> str:
    """The schema in GraphQL SDL, for the docs."""
    return str(schema)


__all__ = ["PATH", "GraphContext", "MeshGraphQLView", "install", "schema", "sdl"]
