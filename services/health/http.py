"""The health service's HTTP side: ``/`` (the dashboard, with a strict CSP),
``/healthz``, ``/readyz``, ``/status`` and ``/metrics``. The routes read the service
through the calls they are handed, never the service object."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from services.health.dashboard import DASHBOARD_HTML

DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
    " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)


@dataclass(frozen=True)
class HealthRoutes:
    """The five routes, answering from what the service hands over."""

    service: str
    instance: str
    status: Callable[[], dict[str, Any]]
    readiness: Callable[[], Awaitable[dict[str, Any]]]
    before_metrics: Callable[[], None]  # bring the gauges up to date

    def make_app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/", self.h_dashboard),
                web.get("/healthz", self.h_healthz),
                web.get("/readyz", self.h_readyz),
                web.get("/status", self.h_status),
                web.get("/metrics", self.h_metrics),
            ]
        )
        return app

    async def h_dashboard(self, _: web.Request) -> web.Response:
        return web.Response(
            text=DASHBOARD_HTML,
            content_type="text/html",
            headers={
                "Content-Security-Policy": DASHBOARD_CSP,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def h_healthz(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True, "service": self.service, "instance": self.instance},
            headers={"Cache-Control": "no-store"},
        )

    async def h_readyz(self, _: web.Request) -> web.Response:
        doc = await self.readiness()
        return web.json_response(
            doc, status=200 if doc["ready"] else 503, headers={"Cache-Control": "no-store"}
        )

    async def h_status(self, _: web.Request) -> web.Response:
        return web.json_response(
            self.status(),
            headers={"Cache-Control": "no-store"},
            dumps=dumps,
        )

    async def h_metrics(self, _: web.Request) -> web.Response:
        self.before_metrics()
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
