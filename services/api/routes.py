"""The route table of the API: every ``routes_*`` module's routes, in one table.

Add a module here (one line) to add its endpoints; ``register(table)`` in it does the rest.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from services.api.paging import ListQuery
from services.api.routing import RouteTable

# One line per routes module: each has ``register(table: RouteTable) -> None``.
ROUTE_MODULES = (
    "services.api.routes_meta",
    "services.api.routes_events",
    "services.api.routes_targets",
    "services.api.routes_admin",
    "services.api.routes_history",
    "services.api.portal",
    "services.api.routes_tenants",
)

# The lists their handlers answer whole, paged by the table (services/api/paging.py):
# operation id -> the fields they are sorted by. The history lists page in their queries.
PAGED = {
    "listTargets": ("name",),
    "listPropagations": ("id",),
    "listRevokedTokens": ("kind", "id"),
    "listTenants": ("name",),
}


def route_table() -> RouteTable:
    table = RouteTable()
    for name in ROUTE_MODULES:
        importlib.import_module(name).register(table)
    for i, route in enumerate(table.routes):
        fields = PAGED.get(route.operation_id)
        if fields is not None:
            assert route.query is None, route.operation_id
            more = " Sorted; page with limit and the Next-Cursor header."
            table.routes[i] = replace(
                route,
                query=ListQuery,
                paged_by=fields,
                description=(route.description + more).strip(),
            )
    return table
