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
    tenancy.py         tenant scoping helpers: visible(), check(), tenant_for_create()
    quotas.py          tenant quotas: max_targets (409), events/s published (429)
    routes_tenants.py  /v1/tenants: list, get, create, quota, delete

Tenants (mesh/tenants.py): an API key made with ``--tenant T`` is a tenant key; one
without is an operator key (all tenants; every key made before tenants is one).
A tenant key sees only tenant T: listings hold T's records only, and any path that
names another tenant's resource answers exactly as a missing one (404, same words;
never 403). Records it creates go to T (a body ``tenant`` naming another is a 422);
an operator may pass ``"tenant": "T"`` when creating a target or propagation (no
tenant: ``default``). The tenant-scoped API today:

    GET/POST /v1/targets, GET/PATCH/DELETE /v1/targets/{name},
    POST /v1/targets/{name}/pause|resume|rotate-secret      (T's targets)
    GET/POST /v1/propagations, DELETE /v1/propagations/{id} (T's propagations)
    GET /v1/tenants (T alone), GET /v1/tenants/{tenant}     (T's quotas)
    POST /v1/graphql                                        targets/propagations only

Every other route is a 404 for tenant keys (``Route.tenant_aware`` is False unless a
module registers with ``table.extend(routes, tenant_aware=True)``, which it does
once its handlers scope by ``call.tenant``): deny by default, so a new route cannot
leak across tenants. Creating, deleting tenants and quotas (``POST /v1/tenants``,
``PATCH /v1/tenants/{tenant}/quota``, ``DELETE /v1/tenants/{tenant}``) need an
operator admin key.

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
