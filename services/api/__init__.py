"""The HTTP API service (``mesh serve api``, part of ``mesh up``; port 9402).

Layout::

    service.py         Api(Service): the aiohttp server, TLS, start/drain/close
    context.py         ApiContext: what handlers may use of the running service
    routing.py         Route, RouteTable, Call, Reply: the declarative route table
    routes.py          ROUTE_MODULES and route_table(): every routes_* module in one table
    openapi.py         the OpenAPI 3.1 document and the /v1/docs page, built from the table
    problems.py        RFC 9457 problem types and the middleware that answers with them
    auth.py            API keys (Authorization: Bearer), scopes, per-key rate limit
    idempotency.py     Idempotency-Key state in a KV bucket
    audit.py           audit records of every change, persisted by the sink
    routes_meta.py     /v1/openapi.json, /v1/docs, /v1/status
    routes_events.py   POST /v1/events, POST /v1/events:batch
    routes_targets.py  targets and propagations
    routes_admin.py    bridge tokens
    routes_history.py  events, deliveries, dead letters, replay (models: history_models.py)
    graphql.py         read-only GraphQL at /v1/graphql (strawberry)

Adding endpoints: write ``routes_<area>.py`` with pydantic request/response models,
handlers ``async def h(call: Call) -> Model | list[Model] | Reply`` and a
``register(table: RouteTable) -> None`` that adds one ``Route`` per operation
(method, path, handler, summary, tags, scope, operationId, body/query/response
models, success status, extra problem statuses, path/header ``Param``\\ s). Then add
the module's name to ``routes.ROUTE_MODULES`` (one line) and regenerate the
checked-in document: ``python scripts/openapi.py > docs/openapi.json``. Raise ``MeshError``\\ s
(or ``ApiProblem``) for failures; the middleware turns them into problems. A change
records an audit entry with ``call.api.audit.record(call.actor, action, entity, ...)``.
"""

from services.api.service import Api

__all__ = ["Api"]
