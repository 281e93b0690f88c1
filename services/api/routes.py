"""The route table of the API: every ``routes_*`` module's routes, in one table.

Add a module here (one line) to add its endpoints; ``register(table)`` in it does the rest.
"""

from __future__ import annotations

import importlib

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


def route_table() -> RouteTable:
    table = RouteTable()
    for name in ROUTE_MODULES:
        importlib.import_module(name).register(table)
    return table
